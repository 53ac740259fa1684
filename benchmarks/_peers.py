"""What the side-by-side benchmarks (vs_llama_cpp.py, vs_bitnet_cpp.py) share: their common
arguments, the dummy model, the tritlm side (a worker in a fresh interpreter), running a
subprocess and explaining its failure, a gauge of what the machine's other processes took
meanwhile, and the side-by-side table.

Standard library only: the parent process imports neither numpy nor tritlm nor a peer; it only
starts processes and prints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path


def add_common_arguments(p: argparse.ArgumentParser, model_help: str, workers) -> None:
    p.add_argument("-m", "--model", help=model_help)
    p.add_argument("--preset", default="2B4T", help="dummy model shape, a `tritlm dummy` preset (default 2B4T)")
    p.add_argument("--embedding", default="Q6_K", choices=["F16", "Q8_0", "Q6_K"],
                   help="dummy token-embedding type (default Q6_K)")
    p.add_argument("--keep", action="store_true", help="keep the dummy model file (its path is printed)")
    p.add_argument("-p", "--n-prompt", type=int, nargs="+", default=[128], help="prompt lengths (default 128)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="tokens to generate (default 128; 0: none)")
    p.add_argument("-t", "--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    p.add_argument("-r", "--repetitions", type=int, default=3,
                   help="timed runs per test, after one warm-up run (default 3)")
    p.add_argument("--isa", help="tritlm's kernel set (TRITLM_ISA), e.g. avx2 or avx512 (default: the best here)")
    p.add_argument("--seed", type=int, default=0, help="seed of the token ids (default 0)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds each subprocess may take (default 3600)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    p.add_argument("-v", "--verbose", action="store_true", help="pass the subprocesses' logs through to stderr")
    p.add_argument("--worker", choices=list(workers), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if min(args.threads) < 1 or min(args.n_prompt) < 1 or args.n_gen < 0 or args.repetitions < 1:
        parser.error("threads, prompt lengths and repetitions must be positive, -n non-negative")
    return args


# ---------------------------------------------------------------------------------- workers

def peak_rss_mb() -> float:
    """This process's resident high-water mark. VmHWM belongs to the address space, so unlike
    ru_maxrss it carries nothing over from the parent across fork + exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    scale = 1 << 20 if sys.platform == "darwin" else 1 << 10  # bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / (1 << 20)


def rate_row(test: str, threads: int, rates: list[float]) -> dict:
    # population std, as tritlm.bench.model reports it
    return {"test": test, "threads": threads, "tokens_per_s": statistics.fmean(rates),
            "std": statistics.pstdev(rates), "runs": rates}


def tritlm_worker(path: str, prompts, n_gen: int, threads, repeats: int, seed: int) -> dict:
    import tritlm
    from tritlm import kernels
    from tritlm.bench import model

    isa = kernels.default_isa()  # TRITLM_ISA, checked before the model loads
    report = model.run(path, prompts=tuple(prompts), n_gen=n_gen, threads=tuple(threads), repeats=repeats, seed=seed)
    report["bench_peak_rss_mb"] = report.pop("peak_rss_mb")  # its ru_maxrss
    return report | {"engine": "tritlm", "version": f"tritlm {tritlm.__version__}", "timer": "wall",
                     "isa": isa, "peak_rss_mb": peak_rss_mb()}


def main(name: str, args, workers: dict, compare, markdown) -> int:
    """A side-by-side script's entry: a worker subprocess's job, or the whole comparison printed."""
    if args.worker:
        return run_worker(workers, args)
    try:
        report = compare(args)
    except WorkerError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1) if args.json else markdown(report))
    return 0


def run_worker(workers: dict, args) -> int:
    """One side's measurements, or why there are none, as JSON in the --result file."""
    try:
        result = workers[args.worker](args.model, args.n_prompt, args.n_gen, args.threads, args.repetitions,
                                      args.seed)
    except Exception as e:  # reported by the parent, with this process's log
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    Path(args.result).write_text(json.dumps(result))
    return 1 if "error" in result else 0


# ---------------------------------------------------------------------------------- subprocesses

class WorkerError(RuntimeError):
    pass


def cpu_busy_seconds() -> float | None:
    """CPU seconds every process on the machine has used since boot (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def gauged(run):
    """run()'s result, its wall seconds, and the CPU seconds the machine's other processes used
    meanwhile (None where /proc/stat is unreadable): a noise gauge, for on a 2-core machine
    anything near one busy core spoils the 2-thread figures."""
    busy, mine, start = cpu_busy_seconds(), children_cpu_seconds(), time.perf_counter()
    result = run()
    wall, busy_after = time.perf_counter() - start, cpu_busy_seconds()
    others = None
    if busy is not None and busy_after is not None:
        others = max((busy_after - busy) - (children_cpu_seconds() - mine), 0.0)
    return result, wall, others


def spawn_worker(script: str, kind: str, args, threads=None, repetitions: int | None = None) -> dict:
    """Run `script --worker kind` on args.model in a fresh interpreter (tritlm with
    TRITLM_ISA=--isa), at these thread counts and repetitions (default: args'), and return its
    JSON result."""
    with tempfile.TemporaryDirectory(prefix="tritlm-peers-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, os.path.abspath(script), "--worker", kind, "--result", str(result),
               "--model", args.model, "-p", *map(str, args.n_prompt), "-n", str(args.n_gen),
               "-t", *map(str, threads or args.threads), "-r", str(repetitions or args.repetitions),
               "--seed", str(args.seed)]
        env = {"TRITLM_ISA": args.isa} if kind == "tritlm" and args.isa else {}
        rc, _, log = run_command(cmd, args.timeout, args.verbose, env)
        report = json.loads(result.read_text()) if result.exists() else {}
        if "error" in report:
            raise WorkerError(f"the {kind} side failed: {report['error']}\n{explain_failure(log, hits=False)}")
        if rc or not report:
            raise WorkerError(f"the {kind} subprocess exited with {rc} and no result\n{explain_failure(log)}")
        return report


def run_command(cmd: list[str], timeout: float, verbose: bool, env: dict | None = None) -> tuple[int, str, str]:
    """Exit status, stdout and the log (stderr; passed through instead where verbose) of cmd,
    offline, within timeout seconds."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"} | (env or {})
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if verbose else subprocess.PIPE,
                              text=True, errors="replace", timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        log = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise WorkerError(f"{' '.join(cmd[:4])} ... ran past {timeout:.0f} s\n{explain_failure(log)}") from None
    return done.returncode, done.stdout, done.stderr or ""


def explain_failure(log: str, tail: int = 25, hits: bool = True) -> str:
    """The lines of a subprocess's log that name a problem (hits), then its last lines."""
    lines = log.splitlines()
    keys = ("error", "failed", "invalid", "unknown", "missing", "not a multiple", "not supported", "unsupported")
    found = [l for l in lines if any(k in l.lower() for k in keys)] if hits else []
    parts = (["lines naming the problem:", *found[-15:], ""] if found else []) + [f"its last {tail} log lines:",
                                                                                  *lines[-tail:]]
    return "\n".join("    " + l for l in parts)


def dummy_model(args, arch: str, ternary_type: str) -> tuple[str | None, str]:
    """With no --model: write `tritlm dummy` under the system temporary directory (in a
    subprocess, so this process never imports tritlm) and point args.model at it. Returns the
    file made (None with --model) and how the model came about."""
    if args.model:
        return None, "given with --model"
    fd, path = tempfile.mkstemp(prefix=f"tritlm-{args.preset}-{ternary_type.lower()}-", suffix=".gguf")
    os.close(fd)
    flags = ["--preset", args.preset, "--arch", arch, "--type", ternary_type, "--embedding", args.embedding]
    cmd = [sys.executable, "-c", "import sys; from tritlm.cli import main; sys.exit(main(sys.argv[1:]))",
           "dummy", "-o", path, *flags]
    try:
        rc, _, log = run_command(cmd, args.timeout, False)
        if rc:
            raise WorkerError(f"tritlm dummy exited with {rc}\n{explain_failure(log)}")
    except WorkerError:
        os.unlink(path)
        raise
    args.model = path
    return path, f"`tritlm dummy {' '.join(flags)}`"


# ---------------------------------------------------------------------------------- the report

def combine(peer: dict, tritlm: dict, peer_key: str) -> list[dict]:
    """One row per (test, threads) either side measured: both rates and tritlm / peer."""
    a = {(r["test"], r["threads"]): r for r in peer["rows"]}
    b = {(r["test"], r["threads"]): r for r in tritlm["rows"]}
    keys = list(a) + [k for k in b if k not in a]
    rows = []
    for key in keys:
        x, y = a.get(key), b.get(key)
        ratio = y["tokens_per_s"] / x["tokens_per_s"] if x and y and x["tokens_per_s"] > 0 else math.nan
        rows.append({"test": key[0], "threads": key[1], peer_key: _rate(x), "tritlm": _rate(y), "ratio": ratio})
    return rows


def _rate(row: dict | None) -> dict | None:
    return None if row is None else {"tokens_per_s": row["tokens_per_s"], "std": row["std"]}


def _cell(rate: dict | None) -> str:
    return "—" if rate is None else f"{rate['tokens_per_s']:.2f} ± {rate['std']:.2f}"


def table(rows: list[dict], peer_key: str, peer_name: str) -> list[str]:
    lines = [f"| test | threads | {peer_name} tok/s | tritlm tok/s | tritlm / {peer_name} |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = "—" if math.isnan(r["ratio"]) else f"{r['ratio']:.2f}×"
        lines.append(f"| {r['test']} | {r['threads']} | {_cell(r[peer_key])} | {_cell(r['tritlm'])} | {ratio} |")
    return lines


def noise_lines(peer_name: str, peer: dict, tritlm: dict) -> list[str]:
    """How many cores the machine's other processes kept busy while each side ran, and a warning
    where that spoils the figures."""
    if "other_cores_busy" not in peer or "other_cores_busy" not in tritlm:
        return []
    lines = [f"other processes kept {peer['other_cores_busy']:.2f} cores busy on average while {peer_name} ran, "
             f"{tritlm['other_cores_busy']:.2f} while tritlm ran (of {os.cpu_count()})"]
    if max(peer["other_cores_busy"], tritlm["other_cores_busy"]) > 0.25:
        lines.append("WARNING: the machine was not idle; figures at thread counts that need the busy cores "
                     "(spinning thread pools wait on a descheduled thread) are not to be trusted")
    return lines
