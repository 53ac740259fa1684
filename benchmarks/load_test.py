"""A bounded load test of `tritlm serve`, on loopback only; it stops by itself.

It starts the server in a subprocess (on a small random model it writes, unless --model is
given), then runs rounds of concurrent streaming chat clients with the official `openai` client.
A fraction of them hang up mid-stream. It checks that

- every client that stayed got its whole completion (max_tokens tokens, finish_reason "length",
  usage) and the [DONE] that ends the stream,
- afterwards no slot is busy and nothing is queued, the server counted the hang-ups as cancelled,
- the server's memory goes back to where it was idle (RSS after each round vs before).

    python benchmarks/load_test.py                     # 32 clients, a quarter hang up, 2 rounds
    python benchmarks/load_test.py --model m.gguf --clients 64 --max-tokens 64

Exit status 0 when every check passes; a JSON summary is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import openai

SERVE = "import sys; from tritlm.cli import main; sys.exit(main(sys.argv[1:]))"


def small_model(path: str) -> None:
    """A small random model (a few MB): fast enough that the test measures the server. Its
    vocabulary is the 256 bytes and 3 special tokens, so nearly every token brings text."""
    from tritlm.bench.dummy import write_dummy
    from tritlm.models.config import ModelConfig

    write_dummy(path, ModelConfig(arch="bitnet-b1.58", vocab_size=259, hidden_size=512,
                                  intermediate_size=1024, n_layers=4, n_heads=8, n_kv_heads=4,
                                  context_length=1024, rope_theta=10000.0, norm_eps=1e-5))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start_server(args, port: int) -> subprocess.Popen:
    command = [sys.executable, "-c", SERVE, "serve", "-m", args.model, "--host", "127.0.0.1",
               "--port", str(port), "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue),
               "-c", str(args.ctx), "--timeout", str(args.deadline)]
    if args.threads:
        command += ["-t", str(args.threads)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(server: subprocess.Popen, url: str, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not start in time")


async def client(api: openai.AsyncOpenAI, model: str, i: int, args, hang_up_after: int | None) -> dict:
    """One streaming chat; with hang_up_after, close the connection after that many pieces."""
    prompt = f"Client {i}: " + " ".join(random.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(8))
    stream = await api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
        stream=True, stream_options={"include_usage": True}, temperature=0.8, seed=i,
        extra_body={"ignore_eos": True})  # a random model: end-of-turn tokens would end it early
    pieces, finish, usage = 0, None, None
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            pieces += bool(choice.delta.content)
            finish = choice.finish_reason or finish
        if hang_up_after is not None and pieces >= hang_up_after:
            await stream.close()
            return {"hung_up": True}
    return {"hung_up": False, "finish": finish, "completion_tokens": usage}


async def round_(url: str, model: str, args, rng: random.Random) -> dict:
    n_hang = int(args.clients * args.hang_up)
    plan = [None] * (args.clients - n_hang) + [rng.randint(1, args.max_tokens // 2) for _ in range(n_hang)]
    rng.shuffle(plan)
    api = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=args.deadline,
                             http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=args.clients * 2),
                                                           timeout=args.deadline))
    start = time.monotonic()
    results = await asyncio.wait_for(
        asyncio.gather(*(client(api, model, i, args, h) for i, h in enumerate(plan)), return_exceptions=True),
        timeout=args.deadline)
    seconds = time.monotonic() - start
    await api.close()
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    stayed = [r for r in results if isinstance(r, dict) and not r["hung_up"]]
    complete = [r for r in stayed if r["finish"] == "length" and r["completion_tokens"] == args.max_tokens]
    return {"clients": args.clients, "hung_up": sum(isinstance(r, dict) and r["hung_up"] for r in results),
            "stayed": len(stayed), "complete": len(complete), "errors": errors[:5], "seconds": round(seconds, 2),
            "tokens_per_second": round(len(complete) * args.max_tokens / seconds, 1)}


def idle_state(url: str, limit: float = 10.0) -> dict:
    """/health once nothing runs (or after `limit` seconds)."""
    deadline = time.monotonic() + limit
    while True:
        health = httpx.get(url + "/health").json()
        if (health["slots_busy"] == 0 and health["queue"] == 0) or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def cancelled(url: str) -> int:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith('tritlm_sequences_total{outcome="cancelled"}'):
            return int(float(line.split()[1]))
    return -1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="GGUF model (default: a small random model written to a temp dir)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--hang-up", type=float, default=0.25, help="fraction of clients that leave mid-stream")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--ctx", type=int, default=256, help="context per slot")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--deadline", type=float, default=300, help="seconds a round may take at most")
    p.add_argument("--rss-slack-mb", type=float, default=32, help="allowed RSS growth over idle")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if not args.model:
            args.model = os.path.join(tmp, "small.gguf")
            small_model(args.model)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(args, port)
        try:
            wait_ready(server, url, limit=300)
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            rng = random.Random(args.seed)
            # warm up (first-use allocations), then idle memory is the baseline
            asyncio.run(round_(url, model, argparse.Namespace(**{**vars(args), "clients": args.max_batch,
                                                                 "hang_up": 0}), rng))
            idle_state(url)
            summary = {"model": os.path.basename(args.model), "idle_rss_mb": round(rss_mb(server.pid), 1),
                       "rounds": []}
            ok = True
            for _ in range(args.rounds):
                before = cancelled(url)
                result = asyncio.run(round_(url, model, args, rng))
                health = idle_state(url)
                result |= {"cancelled_by_server": cancelled(url) - before, "after": health,
                           "rss_mb": round(rss_mb(server.pid), 1)}
                summary["rounds"].append(result)
                ok &= (not result["errors"]  # nobody who stayed lost anything; every hang-up was cancelled
                       and result["complete"] == result["stayed"] == args.clients - result["hung_up"]
                       and result["cancelled_by_server"] == result["hung_up"]
                       and health["slots_busy"] == 0 and health["queue"] == 0
                       and result["rss_mb"] - summary["idle_rss_mb"] <= args.rss_slack_mb)
            summary["ok"] = bool(ok)
            print(json.dumps(summary, indent=2))
            return 0 if ok else 1
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    sys.exit(main())
