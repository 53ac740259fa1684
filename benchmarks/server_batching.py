"""Does batching pay? Aggregate decode tokens/s of `tritlm serve` with S concurrent streams
against one stream, on the same model, over loopback.

Decode speed is measured from the client, end to end (HTTP, scheduler, sampling, engine): a
request for N tokens minus a request for 1 token (the same prompt: prefill and overheads cancel)
leaves the time of N - 1 decode steps. With S concurrent requests, the aggregate rate is
S * (N - 1) over that difference. Requests set `ignore_eos` (a random model's end-of-turn
tokens would end them early), so each generates exactly N tokens.

On a machine shared with other jobs, wall time swings with their load; so the same ratio is also
given in the server process's CPU time (user + system, all its threads), which other processes
disturb far less: how much work a token costs, batched or not.

    python benchmarks/server_batching.py --model /tmp/dummy-2b4t-i2s.gguf --streams 8 --repeat 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(__file__))
from load_test import free_port, start_server, wait_ready  # noqa: E402

PROMPT = "The capital of France is Paris. The capital of Italy is"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def timed(http: httpx.AsyncClient, streams: int, max_tokens: int, temperature: float,
                pid: int) -> tuple[float, float]:
    """Wall and server CPU seconds for `streams` concurrent completions of max_tokens tokens each."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": temperature, "ignore_eos": True}

    async def one(i):
        r = await http.post("/v1/completions", json=body | {"seed": i})
        r.raise_for_status()
        assert r.json()["usage"]["completion_tokens"] == max_tokens

    start, cpu = time.perf_counter(), cpu_seconds(pid)
    await asyncio.gather(*(one(i) for i in range(streams)))
    return time.perf_counter() - start, cpu_seconds(pid) - cpu


async def measure(url: str, pid: int, args) -> list[dict]:
    rows, n, s = [], args.max_tokens, args.streams
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        # Warm up every slot: each then holds the prompt, so every timed request reuses it and
        # prefill cancels in the differences (a first-time prefill would land in one term only)
        await timed(http, s, 4, args.temperature, pid)
        for repeat in range(args.repeat):
            t = {}
            for streams in (1, s):  # interleaved, so drift hits both alike
                t[streams, n] = await timed(http, streams, n, args.temperature, pid)
                t[streams, 1] = await timed(http, streams, 1, args.temperature, pid)
            wall = {k: k * (n - 1) / (t[k, n][0] - t[k, 1][0]) for k in (1, s)}
            cpu = {k: k * (n - 1) / max(t[k, n][1] - t[k, 1][1], 1e-9) for k in (1, s)}
            rows.append({"repeat": repeat + 1, "single_tok_s": round(wall[1], 2), "aggregate_tok_s": round(wall[s], 2),
                         "ratio": round(wall[s] / wall[1], 2), "cpu_ratio": round(cpu[s] / cpu[1], 2),
                         "seconds": {f"{k}x{m}": [round(v, 2) for v in t[k, m]] for k, m in t}})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="GGUF model (e.g. a 2B4T-shaped `tritlm dummy`)")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(argparse.Namespace(model=args.model, max_batch=args.streams, max_queue=args.streams,
                                             ctx=512, deadline=600, threads=args.threads), port)
    try:
        wait_ready(server, url, limit=600)
        rows = asyncio.run(measure(url, server.pid, args))
    finally:
        server.terminate()
        server.wait(30)
    for key, what in (("ratio", "wall time"), ("cpu_ratio", "server CPU time")):
        ratios = [r[key] for r in rows]
        print(f"{args.streams} streams vs 1, aggregate decode tokens/s by {what}: {statistics.median(ratios):.2f}x "
              f"(runs: {', '.join(map(str, ratios))}; temperature {args.temperature})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
