"""Attention alone, at the 2B4T shape (20 query heads over 5 KV heads of 128, f16 cache): a
prompt's last 256 tokens at several lengths (prefill), and one token or 4 (a batched or
speculative step) over a long cache (decode), at 1 and 2 threads, in G multiply-adds/s
(q . k and p v both counted) and, for decode, GB/s of cache read.

    python benchmarks/attention.py [--isa avx2] [--lengths 512 4096]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tritlm import ops

HQ, HKV, D, PROMPT = 20, 5, 128, 256


def best_seconds(f, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--isa", default=None, help="avx512, avx2 or portable (default: the best here)")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 4096], help="cache lengths (default 512 4096)")
    p.add_argument("-t", "--threads", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    n = max(args.lengths)
    cache_k, cache_v = np.zeros((n, HKV, D), np.float16), np.zeros((n, HKV, D), np.float16)
    ops.store_kv(cache_k, cache_v, rng.standard_normal((n, HKV, D), np.float32),
                 rng.standard_normal((n, HKV, D), np.float32), 0)
    print("| test | keys | threads | ms | G multiply-adds/s | cache GB/s |\n|---|---|---|---|---|---|")
    for keys in args.lengths:
        for name, tokens, repeats in ((f"prefill {PROMPT} tokens", min(PROMPT, keys), 3), ("decode 1 token", 1, 20),
                                      ("decode 4 tokens", 4, 20)):
            positions = np.arange(keys - tokens, keys, dtype=np.int32)
            q = rng.standard_normal((tokens, HQ, D), np.float32)
            fmas = float((positions + 1).sum()) * HQ * D * 2
            for threads in args.threads:
                s = best_seconds(lambda: ops.attention(q, cache_k, cache_v, positions, isa=args.isa,
                                                       n_threads=threads), repeats)
                read = "" if tokens > 4 else f"{keys * HKV * D * 2 * 2 / s / 1e9:.1f}"
                print(f"| {name} | {keys} | {threads} | {s * 1e3:.2f} | {fmas / s / 1e9:.2f} | {read} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
