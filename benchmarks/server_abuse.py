"""A bounded abuse test of `tritlm serve`, on loopback only; it stops by itself in seconds.

It starts the server in a subprocess (the bundled tiny model unless --model is given) with an
API key, the Host check on and small limits, then runs a few normal streaming clients (greedy,
fixed max_tokens) once each alone, for reference, and then over and over while every class of
hostile or broken request below hits the server, /health being polled every 20 ms throughout
(by a process of its own, so that what this one does can't delay it). It checks that

- every normal request got its whole answer, identical to the one it got alone: none lost or
  corrupted;
- every hostile request got what its class should (a 4xx, a clean completion, or a connection
  the server closed within --read-timeout), never a 5xx, and the server logged no traceback;
- /health answered (200) throughout, within --health-bound seconds;
- afterwards every slot is idle, nothing is queued and the engine counted no failed sequence;
- SIGTERM stops the server.

    python benchmarks/server_abuse.py                  # prints a JSON summary; exit status 0: all passed

The worst /health latency measured here says how responsive the server stays under abuse, on
this machine, at this load; it is not a speed figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict

import httpx

SERVE = "import sys; from tritlm.cli import main; sys.exit(main(sys.argv[1:]))"
KEY = "abuse-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Once upon a time", "Unicode ☃ 日本語"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="GGUF model (default: the bundled tiny model)")
    p.add_argument("--clients", type=int, default=4, help="normal streaming clients (at most 4)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per normal request")
    p.add_argument("--repeat", type=int, default=3, help="requests of each hostile class")
    p.add_argument("--read-timeout", type=float, default=2.0, help="the server's --read-timeout")
    p.add_argument("--max-body-bytes", type=int, default=256 * 1024, help="the server's --max-body-bytes")
    p.add_argument("--threads", type=int, default=None, help="the server's engine threads")
    p.add_argument("--health-bound", type=float, default=0.1, help="seconds /health may take at worst")
    p.add_argument("--deadline", type=float, default=60, help="seconds the clients may take at most")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the server


def start_server(args, port: int, log) -> subprocess.Popen:
    command = [sys.executable, "-c", SERVE, "serve", "--host", "127.0.0.1", "--port", str(port), "-c", "512",
               "--max-batch", "4", "--max-queue", "16", "--api-key", KEY, "--allowed-hosts", "127.0.0.1,localhost",
               "--max-body-bytes", str(args.max_body_bytes), "--read-timeout", str(args.read_timeout)]
    command += ["-m", args.model] if args.model else []
    command += ["-t", str(args.threads)] if args.threads else []
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)


def wait_ready(server: subprocess.Popen, url: str, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the server did not start in time")


POLLER = """
import json, select, sys, time, httpx
latencies, failures = [], []
with httpx.Client(base_url=sys.argv[1], timeout=10) as http:
    print("ready", flush=True)
    while not select.select([sys.stdin], [], [], 0.02)[0]:  # every 20 ms until told to stop
        started = time.perf_counter()
        try:
            status = http.get("/health").status_code
        except httpx.HTTPError as e:
            status = repr(e)
        latencies.append(time.perf_counter() - started)
        if status != 200:
            failures.append(status)
print(json.dumps({"latencies": latencies, "failures": failures}))
"""


class HealthPoller:
    """A process that GETs /health every 20 ms until stopped: the latencies, and any answer but 200."""

    def __init__(self, url: str):
        self.process = subprocess.Popen([sys.executable, "-c", POLLER, url], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline() == "ready\n"

    def stop(self) -> tuple[list[float], list]:
        out, _ = self.process.communicate("stop\n", timeout=30)
        result = json.loads(out)
        return result["latencies"], result["failures"]


# ------------------------------------------------------------------------ normal clients


async def normal(http: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple:
    """One greedy streamed completion: (text, finish_reason, completion_tokens), or an error."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    text, finish, tokens = "", None, None
    async with http.stream("POST", "/v1/completions", json=body, headers=AUTH) as response:
        if response.status_code != 200:
            return ("status", response.status_code)
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return ("error", chunk["error"]["message"])
            for choice in chunk["choices"]:
                text += choice["text"]
                finish = choice["finish_reason"] or finish
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (text, finish, tokens)


# ----------------------------------------------------------------------- hostile requests


async def exchange(port: int, data: bytes, wait: float) -> str:
    """Send raw bytes; then the status of the answer, "closed" if the server hung up without one,
    or "open" if after `wait` seconds it had done neither."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(65536), wait)
        except TimeoutError:
            return "open"
        except ConnectionError:
            return "closed"
        return answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1 ") else "closed"
    finally:
        writer.close()


def head(path: str, length: int | None, headers: dict | None = None) -> bytes:
    """A POST's head; length None: a chunked body."""
    size = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", size]
    return ("\r\n".join(lines + [f"{k}: {v}" for k, v in (headers or {}).items()]) + "\r\n\r\n").encode()


def chunked(data: bytes, size: int = 65536) -> bytes:
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4} | fields


def hostile_classes(args, port: int) -> dict:
    """Each class: (what it sends, as a coroutine function of the client; the outcomes it may get)."""
    big = args.max_body_bytes

    def post(path, expected, body=None, content=None, headers=AUTH):
        # Python's json writes what JSON can't hold: Infinity, NaN, lone surrogates
        data = json.dumps(body).encode() if body is not None else content

        async def send(http):
            response = await http.post(path, content=data, headers=headers | {"content-type": "application/json"})
            return str(response.status_code)
        return send, expected

    def raw(data: bytes, expected, wait: float = 5.0):
        async def send(http):
            return await exchange(port, data, wait)
        return send, expected

    slow = args.read_timeout + 3  # the server must have closed these by then
    return {
        "seed -1": post("/v1/completions", {"200"}, {"prompt": "hi", "seed": -1, "temperature": 1, "max_tokens": 4}),
        "seed 2**80": post("/v1/completions", {"200"}, {"prompt": "hi", "seed": 2**80, "temperature": 1,
                                                        "max_tokens": 4}),
        "temperature 1e-310": post("/v1/chat/completions", {"200"}, chat(temperature=1e-310)),
        "temperature inf": post("/v1/chat/completions", {"400"}, chat(temperature=float("inf"))),
        "temperature nan": post("/v1/chat/completions", {"400"}, chat(temperature=float("nan"))),
        "temperature -1": post("/v1/chat/completions", {"400"}, chat(temperature=-1)),
        "top_p nan": post("/v1/chat/completions", {"400"}, chat(top_p=float("nan"))),
        "body over the limit": raw(head("/v1/completions", big + 1, AUTH) + b"{" * 65536, {"413"}),
        "chunked body over the limit": raw(head("/v1/completions", None, AUTH) + chunked(b" " * (big + 1000)),
                                           {"413"}),
        "no key, 40 MB body": raw(head("/v1/completions", 40_000_000) + b"{" * 65536, {"401"}),
        "wrong key": post("/v1/completions", {"401"}, {"prompt": "hi"}, headers={"Authorization": "Bearer nope"}),
        "foreign Host": post("/v1/models", {"400"}, {}, headers=AUTH | {"Host": "evil.example"}),
        "lone surrogate": post("/v1/chat/completions", {"400"},
                               chat(messages=[{"role": "user", "content": "a\ud800"}])),
        "tool role": post("/v1/chat/completions", {"400"}, chat(messages=[{"role": "tool", "content": "42"}])),
        "long stop string": post("/v1/completions", {"200"}, {"prompt": "hi", "stop": "s" * 40, "max_tokens": 4}),
        "3000 embedding inputs": post("/v1/embeddings", {"400"}, {"input": ["hi"] * 3000}),
        "prompt too long": post("/v1/completions", {"400"}, {"prompt": "hi " * (big // 4)}),
        # the costliest bodies to parse: as many tiny JSON containers, or numbers, as the limits let in
        "a body of tiny arrays": post("/v1/completions", {"400"}, content=b'{"prompt": [' + b"[],"
                                      * (big // 3 - 10) + b"[]]}"),
        "a body of tiny messages": post("/v1/chat/completions", {"400"}, content=b'{"messages": ['
                                        + b'{"role":"user","content":"a"},' * (big // 31 - 2) + b'{"role":"user"}]}'),
        "a body of token ids": post("/v1/completions", {"400"}, {"prompt": [1] * (big // 3 - 10)}),
        "too many sequences": post("/v1/completions", {"400"}, {"prompt": ["hi"] * 10, "n": 4}),
        "malformed JSON": post("/v1/chat/completions", {"400"}, content=b'{"messages": [{"role": '),
        "wrong types": post("/v1/chat/completions", {"400"}, {"messages": "hi", "max_tokens": "many"}),
        "connects, sends nothing": raw(b"", {"closed"}, slow),
        "half a request head": raw(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0", {"closed"}, slow),
        "half a body": raw(head("/v1/completions", 1000, AUTH) + b'{"prompt": "hi', {"closed"}, slow),
        "garbage": raw(b"\x16\x03\x01 not HTTP\r\n\r\n", {"400", "closed"}),
    }


# --------------------------------------------------------------------------------- the run


async def abuse(args, url: str, port: int) -> dict:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        prompts = PROMPTS[: args.clients]
        reference = [await normal(http, p, args.max_tokens) for p in prompts]  # alone, one at a time
        classes = hostile_classes(args, port)
        outcomes: dict = defaultdict(Counter)
        flood_over = asyncio.Event()

        async def hostile(name, send):
            try:
                outcomes[name][await send(http)] += 1
            except httpx.HTTPError as e:
                outcomes[name][type(e).__name__] += 1

        async def flood():
            await asyncio.gather(*(hostile(name, send) for name, (send, _) in classes.items()
                                   for _ in range(args.repeat)))
            flood_over.set()

        async def client(i):  # over and over until the flood is over: each answer against the reference
            answers = []
            while not flood_over.is_set() or not answers:
                answers.append(await normal(http, prompts[i], args.max_tokens))
            return answers

        poller = HealthPoller(url)
        try:
            started = time.monotonic()
            results = await asyncio.gather(flood(), *(client(i) for i in range(len(prompts))))
            seconds = time.monotonic() - started
        finally:
            latencies, failures = poller.stop()
    answers = [(i, a) for i, answers in enumerate(results[1:]) for a in answers]
    wrong = [(prompts[i], a) for i, a in answers if a != reference[i]]
    unexpected = {name: dict(got) for name, got in outcomes.items() if set(got) - classes[name][1]}
    return {"seconds": round(seconds, 2),
            "normal": {"requests": len(answers), "identical_to_alone": len(answers) - len(wrong),
                       "complete_alone": sum(r[1] == "length" and r[2] == args.max_tokens for r in reference),
                       "wrong": wrong[:3]},
            "hostile": {name: dict(got) for name, got in outcomes.items()},
            "hostile_requests": sum(sum(got.values()) for got in outcomes.values()),
            "unexpected": unexpected,
            "health": {"polls": len(latencies), "worst_ms": round(1000 * max(latencies), 1),
                       "median_ms": round(1000 * sorted(latencies)[len(latencies) // 2], 1),
                       "failures": failures[:5]}}


def metrics(url: str) -> dict:
    text = httpx.get(url + "/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}


def run(args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile("w+")
    server = start_server(args, port, log)
    try:
        wait_ready(server, url)
        report = asyncio.run(asyncio.wait_for(abuse(args, url, port), args.deadline))  # a hung server fails
        deadline = time.monotonic() + 10
        while (health := httpx.get(url + "/health").json())["slots_busy"] and time.monotonic() < deadline:
            time.sleep(0.05)
        counts = metrics(url)
        report["after"] = health
        report["failed_sequences"] = counts.get('tritlm_sequences_total{outcome="error"}', -1)
        report["http_5xx"] = sum(v for k, v in counts.items() if k.startswith("tritlm_http_requests_total")
                                 and 'status="5' in k)
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(15)
            report["sigterm_stop_seconds"] = round(time.monotonic() - started, 2)
        except subprocess.TimeoutExpired:
            report["sigterm_stop_seconds"] = None
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    with log:
        log.seek(0)
        report["tracebacks_in_log"] = log.read().count("Traceback")
    normal_ok = report["normal"]
    report["ok"] = bool(
        normal_ok["identical_to_alone"] == normal_ok["requests"] and normal_ok["complete_alone"] == args.clients
        and not report["unexpected"] and not report["health"]["failures"]
        and report["health"]["worst_ms"] <= 1000 * args.health_bound
        and report["after"]["slots_busy"] == 0 and report["after"]["queue"] == 0
        and report["failed_sequences"] == 0 and report["http_5xx"] == 0
        and report["sigterm_stop_seconds"] is not None and report["tracebacks_in_log"] == 0)
    return report


def main(argv=None) -> int:
    report = run(parse_args(argv))
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
