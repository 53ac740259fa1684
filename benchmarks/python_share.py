"""How much of a decode step is Python: the time of `Engine.forward` for one token (with a greedy
argmax, as generation does) against the time spent inside the native step it calls.

    python benchmarks/python_share.py MODEL.gguf --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tritlm.api import LLM


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("-n", "--steps", type=int, default=64)
    args = p.parse_args(argv)
    engine = LLM(args.model, n_threads=args.threads, n_ctx=512).engine
    seq = engine.new_sequence()
    engine.forward([(seq, list(range(1, 33)))])

    native_forward, native = engine._model.forward, [0.0]

    class Timed:  # stands in for the native model: times each call
        @staticmethod
        def forward(*a):
            start = time.perf_counter()
            out = native_forward(*a)
            native[0] += time.perf_counter() - start
            return out

    engine._model, token = Timed(), 5
    start = time.perf_counter()
    for _ in range(args.steps):
        token = int(np.argmax(engine.forward([(seq, [token])])[0][-1]))
    total = time.perf_counter() - start
    print(f"decode step {total / args.steps * 1e3:.2f} ms, native {native[0] / args.steps * 1e3:.2f} ms: "
          f"Python {100 * (total - native[0]) / total:.2f}% of the step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
