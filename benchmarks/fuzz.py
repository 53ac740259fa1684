"""Long runs of the model-file fuzzer (tests/fuzzing.py): mutated GGUF files, safetensors files
and Hugging Face directories, each loaded by tritlm.LLM in a child forked from a fork server,
with a time and an address-space limit.

    python benchmarks/fuzz.py --inputs 100000 --seed 1            # split evenly over the kinds
    python benchmarks/fuzz.py --inputs 3000 --kinds hf --areas format

Prints the outcomes per kind (loaded, ValueError, OSError: fine; crash, hang, other, escaped:
failures), then the failures grouped by outcome, exception type and the innermost tritlm frame,
with one example each. Failing inputs (--keep per group) are saved under --failures, each with
a report.json. Exit status 1 if any input failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import fuzzing  # noqa: E402

FRAME = re.compile(r'File "([^"]*/tritlm/[^"]+)", line (\d+),? in (\S+)')


def where(result: fuzzing.Result) -> str:
    """The innermost tritlm frame of a failure, as tritlm/<module>:<line> in <function>.
    Python tracebacks list the innermost frame last, faulthandler's (crashes, hangs) first."""
    frames = FRAME.findall(result.traceback)
    if not frames:
        return "-"
    path, line, function = frames[0] if "most recent call first" in result.traceback else frames[-1]
    return f"tritlm/{path.rsplit('/tritlm/', 1)[1]}:{line} in {function}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=3000, help="inputs in all, split evenly over the kinds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", nargs="+", choices=fuzzing.KINDS, default=list(fuzzing.KINDS))
    p.add_argument("--areas", nargs="+", choices=("format", "content"), default=["format", "content"],
                   help="format: the files' structure (tritlm.formats); content: values the loader, "
                        "config and tokenizer read")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per input")
    p.add_argument("--memory-mb", type=int, default=1024, help="address space a child may add")
    p.add_argument("--no-logits", action="store_true", help="only load, without one token's logits")
    p.add_argument("--failures", default="fuzz-failures", help="folder for the failing inputs")
    p.add_argument("--keep", type=int, default=3, help="failing inputs saved per group")
    args = p.parse_args(argv)

    work = tempfile.mkdtemp(prefix="tritlm-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    groups: dict[tuple, list] = {}  # (kind, outcome, type, where) -> [count, example]
    totals = {}
    start = time.time()
    print(f"{'kind':<12}" + "".join(f"{o:>11}" for o in fuzzing.OUTCOMES), flush=True)
    try:
        seeds = fuzzing.write_seeds(work)
        mutator = fuzzing.Mutator(seeds, work, areas=tuple(args.areas))
        with fuzzing.ForkServer(work, seeds, timeout=args.timeout, memory=args.memory_mb << 20,
                                logits=not args.no_logits) as server:
            for i, kind in enumerate(args.kinds):
                n = args.inputs // len(args.kinds) + (i < args.inputs % len(args.kinds))
                done = [0]

                def record(x, result, directory, kind=kind):
                    done[0] += 1
                    if done[0] % 2000 == 0:
                        print(f"  {kind}: {done[0]}/{n} after {time.time() - start:.0f} s", file=sys.stderr, flush=True)
                    if result.passed:
                        return
                    key = (kind, result.outcome, result.type, where(result))
                    group = groups.setdefault(key, [0, x.describe(), result.message])
                    group[0] += 1
                    if group[0] <= args.keep:
                        save(args.failures, len(groups), group[0], x, result, directory)

                totals[kind] = server.fuzz(mutator, kind, n, seed=f"{args.seed}/{kind}", on_result=record)
                print(f"{kind:<12}" + "".join(f"{totals[kind][o]:>11}" for o in fuzzing.OUTCOMES), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    seconds = time.time() - start
    total = sum(sum(c.values()) for c in totals.values())
    print(f"{total} inputs in {seconds:.0f} s ({1000 * seconds / max(total, 1):.1f} ms each), seed {args.seed}, "
          f"areas {' '.join(args.areas)}")
    if groups:
        print(f"\nfailures by kind, outcome, type and innermost tritlm frame (inputs saved in {args.failures}):")
    for i, ((kind, outcome, type_, frame), (count, example, message)) in enumerate(groups.items(), 1):
        print(f"[{i}] {count:>6}  {kind} {outcome} {type_} at {frame}\n"
              f"           e.g. {example}\n           -> {message[:300]}")
    return 1 if groups else 0


def save(folder: str, group: int, n: int, x, result, directory: str) -> None:
    target = os.path.join(folder, f"{group:03d}-{n}")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(directory, os.path.join(target, "input"), symlinks=True)
    with open(os.path.join(target, "report.json"), "w") as f:
        json.dump({"kind": x.kind, "target": x.target, "mutations": x.steps, **vars(result)}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
