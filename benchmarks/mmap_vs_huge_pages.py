"""The cost of memory-mapped weights: one process holds the same model twice, weights in the
huge-page arena and mapped from the weight cache (`mmap=True`), and measures each in turn, so a
busy machine slows both alike: the read bandwidth of each buffer (best of 3) and decode tokens/s
(best of 3 runs of 8 tokens), for each thread count. Writes the weight cache if there is none.

    python benchmarks/mmap_vs_huge_pages.py MODEL.gguf -t 1 2
"""

from __future__ import annotations

import argparse
import time

from tritlm import kernels
from tritlm.bench.kernels import read_bandwidth
from tritlm.models import loader
from tritlm.runtime import Engine


def smaps(key: str) -> str:
    """A field of this process's /proc/self/smaps_rollup (kB): how its memory is paged."""
    with open("/proc/self/smaps_rollup") as f:
        return next((line.split()[1] for line in f if line.startswith(key + ":")), "?")


def decode_rate(engine: Engine, n: int = 8) -> float:
    seq = engine.new_sequence()
    engine.forward([(seq, [1])])
    start = time.perf_counter()
    for i in range(n):
        engine.forward([(seq, [i + 2])])
    return n / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("-t", "--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--weight-layout", choices=["tiles", "tiles5"], default="tiles")
    args = p.parse_args(argv)
    config, tensors, _ = loader.load(args.model)
    engines = {"huge pages": Engine(config, tensors, n_ctx=64, weight_layout=args.weight_layout),
               "mmap": Engine(config, tensors, n_ctx=64, weight_layout=args.weight_layout, mmap=True)}
    print(f"AnonHugePages {smaps('AnonHugePages')} kB, FilePmdMapped {smaps('FilePmdMapped')} kB")
    isa = kernels.default_isa()
    for threads in args.threads:
        results = {name: ([], []) for name in engines}
        for _ in range(3):
            for name, engine in engines.items():
                engine.set_threads(threads)
                results[name][0].append(read_bandwidth(engine.weights, threads, isa, 1) / 1e9)
                results[name][1].append(decode_rate(engine))
        for name, (gbps, rates) in results.items():
            print(f"{threads} thread(s), {name:10s}: read {max(gbps):5.1f} GB/s "
                  f"(runs: {' '.join(f'{x:.1f}' for x in gbps)}), decode {max(rates):5.2f} tok/s "
                  f"(runs: {' '.join(f'{x:.2f}' for x in rates)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
