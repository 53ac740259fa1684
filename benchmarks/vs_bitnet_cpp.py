"""bitnet.cpp against tritlm on the very same I2_S GGUF file: prompt processing (pp, the P prompt
tokens in one forward) and generation (tg, N tokens one at a time) tokens/s for each thread
count, side by side, with the ratio tritlm / bitnet.cpp.

    python benchmarks/vs_bitnet_cpp.py --bitnet-bench PATH/TO/llama-bench --preset 2B4T -t 1 2 -r 3 [--isa avx2]

The bitnet.cpp side is the llama-bench of a microsoft/BitNet build (--bitnet-bench, or the
BITNET_LLAMA_BENCH environment variable); this script only runs it. To get one, build BitNet with
its vendored llama.cpp as its setup_env.py does for an I2_S model (on x86: cmake -B build
-DBITNET_X86_TL2=OFF with clang, then `cmake --build build --target llama-bench`).

Without --model it writes a random-weight model with `tritlm dummy --arch bitnet-b1.58 --type
I2_S` (the architecture, layout and file type of the published BitNet-b1.58-2B-4T GGUF) under the
system temporary directory, and deletes it afterwards unless --keep.

Interleaved: for every repetition and thread count each side runs once, in a process of its own,
and the side that goes first alternates from one pair to the next, so drift on a shared machine
(other processes, clocks, page cache) falls on both sides alike:
- bitnet.cpp: `llama-bench -r 1 -o json`, timed by llama-bench itself (a warm-up, then one run of
  each test);
- tritlm: tritlm.bench.model.run (a warm-up run, then one timed run of each test; wall time
  around Engine.forward), with TRITLM_ISA=--isa where given.
Each row is the mean ± population std of the -r runs. Both sides start every run from an empty
cache and draw random token ids (llama-bench std::rand, tritlm numpy); a step's cost does not
depend on them. The ISA each side used is printed: tritlm's kernel set, and bitnet.cpp's compile
flags from compile_commands.json in its build directory (its x86 I2_S kernels are AVX2 code; the
flags decide the rest of ggml, e.g. the embedding's LM head).

The script never touches the network; every subprocess has a time limit (--timeout). Kept out
of CI, like vs_llama_cpp.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _peers  # noqa: E402

BENCH_VARIABLE = "BITNET_LLAMA_BENCH"
SIDES = ("bitnet_cpp", "tritlm")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _peers.add_common_arguments(p, "an I2_S GGUF file both run (default: write a dummy)", WORKERS)
    p.add_argument("--bitnet-bench", default=os.environ.get(BENCH_VARIABLE),
                   help=f"bitnet.cpp's llama-bench binary (default: ${BENCH_VARIABLE})")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    return _peers.check_arguments(parser, parser.parse_args(argv))


WORKERS = {"tritlm": _peers.tritlm_worker}


# ---------------------------------------------------------------------------------- bitnet.cpp

def locate_bench(path: str | None) -> str:
    if not path:
        raise _peers.WorkerError(f"no bitnet.cpp llama-bench: give --bitnet-bench PATH or set {BENCH_VARIABLE} "
                                 "(this script's docstring says how to build one)")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise _peers.WorkerError(f"bitnet.cpp llama-bench {path!r} is not an executable file")
    return os.path.abspath(path)


def build_flags(bench: str) -> str:
    """How bitnet.cpp's I2_S kernels were compiled: the compiler, its -m flags (with this CPU's
    vector extensions where -march=native) and OpenMP, from compile_commands.json in the build
    directory (llama-bench sits in its bin/)."""
    commands = Path(bench).resolve().parents[1] / "compile_commands.json"
    try:
        entries = json.loads(commands.read_text())
        entry = next(e for e in entries if e["file"].endswith("ggml-bitnet-mad.cpp"))
        words = entry["arguments"] if "arguments" in entry else shlex.split(entry["command"])
    except (OSError, ValueError, KeyError, StopIteration):
        return f"unknown (no compile command of ggml-bitnet-mad.cpp in {commands})"
    flags = [w for w in words[1:] if w.startswith("-m") or w.startswith("-O")]
    text = " ".join([os.path.basename(words[0]), *flags])
    if "-march=native" in flags:
        text += f" (this CPU: {' '.join(host_vector_extensions()) or 'unknown'})"
    return text + (", OpenMP" if "-DGGML_USE_OPENMP" in words else ", no OpenMP (ggml's own thread pool)")


def host_vector_extensions() -> list[str]:
    wanted = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi",
              "avx512_bf16")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [w for w in wanted if w in flags]


def bitnet_run(bench: str, args, threads: int) -> dict:
    """One llama-bench process: every test at one thread count, one timed run each."""
    cmd = [bench, "-m", args.model, "-p", ",".join(map(str, args.n_prompt)), "-n", str(args.n_gen),
           "-t", str(threads), "-r", "1", "-o", "json"]
    rc, out, log = _peers.run_command(cmd, args.timeout, args.verbose)
    if rc:
        raise _peers.WorkerError(f"bitnet.cpp's llama-bench exited with {rc}\n{_peers.explain_failure(log)}")
    try:
        return parse_bench_json(out)
    except (ValueError, KeyError, TypeError) as e:
        raise _peers.WorkerError(f"bitnet.cpp's llama-bench printed no JSON results ({e})\n"
                                 f"{_peers.explain_failure(log + out)}") from None


def parse_bench_json(text: str) -> dict:
    """llama-bench's `-o json` records: one row per test, and what it says about its build."""
    records = json.loads(text)
    if not isinstance(records, list) or not records:
        raise ValueError("expected a non-empty JSON list")
    rows = []
    for r in records:
        test = f"pp{r['n_prompt']}" if r["n_gen"] == 0 else f"tg{r['n_gen']}"  # no -pg tests are asked for
        rows.append({"test": test, "threads": r["n_threads"], "tokens_per_s": float(r["avg_ts"])})
    first = records[0]
    return {"build_commit": first.get("build_commit", "unknown"), "cpu_info": first.get("cpu_info", ""),
            "model_type": first.get("model_type", ""), "rows": rows}


# ---------------------------------------------------------------------------------- interleaving

def schedule(repetitions: int, threads) -> list[tuple[int, str]]:
    """(threads, side) in running order: each repetition runs both sides at each thread count,
    and the side that goes first alternates from one pair to the next."""
    order = []
    for r in range(repetitions):
        for i, n in enumerate(threads):
            pair = SIDES if (r * len(threads) + i) % 2 == 0 else SIDES[::-1]
            order += [(n, side) for side in pair]
    return order


def aggregate(runs: list[dict], threads) -> list[dict]:
    """The runs' rows, pooled per (test, threads) into mean ± std, thread counts in order."""
    rates: dict[tuple[str, int], list[float]] = {}
    for run in runs:
        for row in run["rows"]:
            rates.setdefault((row["test"], row["threads"]), []).append(row["tokens_per_s"])
    keys = sorted(rates, key=lambda k: list(threads).index(k[1]))  # stable: tests keep their order
    return [_peers.rate_row(test, n, rates[test, n]) for test, n in keys]


def compare(args) -> dict:
    """The whole comparison: dummy (unless --model), then the interleaved runs."""
    bench = locate_bench(args.bitnet_bench)
    made, description = _peers.dummy_model(args, "bitnet-b1.58", "I2_S")
    runs = {side: [] for side in SIDES}
    gauges = {side: [] for side in SIDES}  # (wall seconds, other processes' CPU seconds) per run
    try:
        for n, side in schedule(args.repetitions, args.threads):
            if side == "bitnet_cpp":
                run = lambda: bitnet_run(bench, args, n)  # noqa: E731
            else:
                run = lambda: _peers.spawn_worker(__file__, "tritlm", args, threads=[n], repetitions=1)  # noqa: E731
            report, seconds, busy = _peers.gauged(run)
            runs[side].append(report)
            gauges[side].append((seconds, busy))
    finally:
        if made and not args.keep:
            os.unlink(made)
    b, t = runs["bitnet_cpp"][0], runs["tritlm"][0]
    bitnet = {"engine": "bitnet.cpp", "bench": bench, "build_commit": b["build_commit"], "cpu_info": b["cpu_info"],
              "model_type": b["model_type"], "build_flags": build_flags(bench), "timer": "llama-bench",
              "rows": aggregate(runs["bitnet_cpp"], args.threads), "runs": runs["bitnet_cpp"]}
    trit = {"engine": "tritlm", "version": t["version"], "isa": t["isa"], "weight_layout": t["weight_layout"],
            "timer": t["timer"], "rows": aggregate(runs["tritlm"], args.threads), "runs": runs["tritlm"]}
    for side, record in (("bitnet_cpp", bitnet), ("tritlm", trit)):
        record["seconds"] = sum(seconds for seconds, _ in gauges[side])
        if record["seconds"] > 0 and all(busy is not None for _, busy in gauges[side]):
            record["other_cores_busy"] = sum(busy for _, busy in gauges[side]) / record["seconds"]
    return {"model": args.model + (" (deleted)" if made and not args.keep else ""), "description": description,
            "prompts": args.n_prompt, "n_gen": args.n_gen, "threads": args.threads,
            "repetitions": args.repetitions, "seed": args.seed,
            "rows": _peers.combine(bitnet, trit, "bitnet_cpp"), "bitnet_cpp": bitnet, "tritlm": trit}


def markdown(report: dict) -> str:
    bitnet, trit = report["bitnet_cpp"], report["tritlm"]
    runs = report["repetitions"]
    lines = [f"model: {report['model']} ({report['description']}); interleaved, {runs} timed "
             f"run{'s' if runs > 1 else ''} per test and side, each after a warm-up",
             f"bitnet.cpp: {bitnet['bench']} (build {bitnet['build_commit']}), compiled {bitnet['build_flags']}; "
             f"timer llama-bench's",
             f"tritlm: {trit['version']}, ISA {trit['isa']}, weights in {trit['weight_layout']}; timer {trit['timer']}",
             "", *_peers.table(report["rows"], "bitnet_cpp", "bitnet.cpp")]
    noise = _peers.noise_lines("bitnet.cpp", bitnet, trit)
    return "\n".join(lines + ([""] + noise if noise else []))


def main(argv=None) -> int:
    return _peers.main("vs_bitnet_cpp", parse_args(argv), WORKERS, compare, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
