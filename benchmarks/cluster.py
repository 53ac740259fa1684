"""Replicas on Ray Serve against one server, on one machine: what Ray costs and what it buys.

Three servers of the same model, one after another, each driven by S concurrent streaming
completions (the async `openai` client, greedy, `ignore_eos`, so each stream generates exactly N
tokens):

  direct   `tritlm serve -t T`                       one engine of T threads
  ray 1xT  `tritlm serve --ray --replicas 1 -t T`    the same engine behind Ray Serve's proxy
  ray Rx1  `tritlm serve --ray --replicas R -t T/R`  R engines of T/R threads

each with S slots per engine (Serve sends each stream to the less busy replica, not always S/R
to each: the table gives how many each ran).

For each: aggregate tokens/s (S * N tokens over the wall time of a round of S streams), the
time per streamed chunk (a stream's time from its first chunk to its last over the chunks
between; the median of the streams) in those rounds and of a stream alone, and the median latency of a tiny request (one generated token) and of GET
/v1/models (no engine work), sent one at a time while nothing else runs. "direct" against
"ray 1xT" is the cost of Ray's proxy, per request and per streamed token; "direct" against
"ray Rx1" is whether replicas pay on one machine.

    python benchmarks/cluster.py --model PATH --streams 16 --tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

import httpx
import openai

PROMPT = "Stream {}: the quick brown fox jumps over the lazy dog, and then"
TINY_REQUESTS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(flags: list[str], port: int, log) -> subprocess.Popen:
    """`tritlm serve FLAGS` on a free port, once it serves (Ray: once every replica runs)."""
    command = [sys.executable, "-m", "tritlm", "serve", *flags, "--port", str(port)]
    print("$", " ".join(command[2:]), file=sys.stderr, flush=True)
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
    server = subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
    ready = "through Ray Serve" if "--ray" in flags else None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited; see {log.name}")
        try:
            healthy = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy and (ready is None or ready in open(log.name).read()):
            return server
        time.sleep(0.5)
    raise RuntimeError(f"the server did not start in time; see {log.name}")


def stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(120)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


async def stream(api: openai.AsyncOpenAI, model: str, i: int, tokens: int) -> tuple[str, list[float]]:
    """One streamed completion of exactly `tokens` tokens: the replica that made it (Ray) and the
    arrival times of its chunks."""
    raw = await api.completions.with_raw_response.create(
        model=model, prompt=PROMPT.format(i), max_tokens=tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    times, usage = [], None
    async for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        usage = chunk.usage or usage
    assert usage.completion_tokens == tokens, usage
    return raw.headers.get("x-replica", "-"), times


async def measure(url: str, args) -> dict:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600) as api:
        model = (await api.models.list()).data[0].id

        async def timed_round(streams: int) -> tuple[float, list[list[float]], str]:
            """Its wall time, each stream's chunk times, and how many streams each replica ran."""
            started = time.perf_counter()
            done = await asyncio.gather(*(stream(api, model, i, args.tokens) for i in range(streams)))
            split = "/".join(str(n) for _, n in Counter(replica for replica, _ in done).most_common())
            return time.perf_counter() - started, [times for _, times in done], split

        rounds = [await timed_round(args.streams) for _ in range(args.repeats + 1)][1:]  # the first warms up every slot
        alone = await timed_round(1)
        tiny, listing = [], []
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            for _ in range(TINY_REQUESTS):
                started = time.perf_counter()
                await api.completions.create(model=model, prompt="Hi", max_tokens=1, temperature=0)
                tiny.append(time.perf_counter() - started)
                started = time.perf_counter()
                (await http.get("/v1/models")).raise_for_status()
                listing.append(time.perf_counter() - started)

    def gap_ms(rounds):  # a stream's time per chunk after its first (Ray's proxy may pass several at once)
        gaps = [(t[-1] - t[0]) / (len(t) - 1) for _, times, _ in rounds for t in times if len(t) > 1]
        return 1e3 * statistics.median(gaps) if gaps else float("nan")  # (text held back may come in one chunk)
    return {"tokens_per_s": [args.streams * args.tokens / wall for wall, _, _ in rounds],
            "split": [split for _, _, split in rounds], "gap_ms": gap_ms(rounds),
            "gap_alone_ms": gap_ms([alone]), "tiny_ms": 1e3 * statistics.median(tiny),
            "models_ms": 1e3 * statistics.median(listing)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="GGUF model (e.g. a 2B4T-shaped `tritlm dummy`)")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams (default 16)")
    p.add_argument("--tokens", type=int, default=64, help="tokens each stream generates (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per server (default 3)")
    p.add_argument("-t", "--threads", type=int, default=os.cpu_count(), help="threads in all (default: the cores)")
    p.add_argument("--replicas", type=int, default=2, help="replicas of the last server (default 2)")
    args = p.parse_args(argv)
    if args.threads % args.replicas:
        p.error("--threads must divide among the --replicas")
    t, r, s = args.threads, args.replicas, args.streams
    common = ["-m", args.model, "-c", str(args.tokens + 256), "--timeout", "0"]
    # every server has a slot for every stream: a stream Serve sends to the busier replica waits for none
    common += ["--max-batch", str(s)]
    servers = {"direct": ["-t", str(t)], f"ray 1x{t}": ["--ray", "--replicas", "1", "-t", str(t)],
               f"ray {r}x{t // r}": ["--ray", "--replicas", str(r), "-t", str(t // r)]}
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, flags in servers.items():
            port = free_port()
            with open(os.path.join(scratch, f"{name.replace(' ', '-')}.log"), "w+") as log:
                server = start(common + flags, port, log)
                try:
                    results[name] = asyncio.run(measure(f"http://127.0.0.1:{port}", args))
                finally:
                    stop(server)
            print(name, results[name], file=sys.stderr, flush=True)
    print(f"\n{s} streams x {args.tokens} tokens, {args.repeats} rounds; {args.model}\n")
    print(f"| server | aggregate tokens/s (each round) | streams per replica | time per chunk: {s} "
          "streams | 1 stream | tiny request | GET /v1/models |")
    print("|---|---|---|---|---|---|---|")
    for name, m in results.items():
        rates = ", ".join(f"{x:.1f}" for x in m["tokens_per_s"])
        print(f"| {name} | {rates} | {', '.join(m['split'])} | {m['gap_ms']:.1f} ms | {m['gap_alone_ms']:.1f} ms "
              f"| {m['tiny_ms']:.1f} ms | {m['models_ms']:.2f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
