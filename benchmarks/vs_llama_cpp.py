"""llama.cpp against tritlm on the very same TQ2_0 GGUF file: prompt processing (pp, the P prompt
tokens in one forward) and generation (tg, N tokens one at a time) tokens/s for each thread
count, side by side, with the ratio tritlm / llama.cpp.

    pip install 'tritlm[bench]'   # llama-cpp-python
    python benchmarks/vs_llama_cpp.py --preset 2B4T -p 128 -n 128 -t 1 2 -r 3

Without --model it writes a random-weight model with `tritlm dummy --arch bitnet --type TQ2_0`
(the architecture name and the ternary layout llama.cpp reads) under the system temporary
directory, and deletes it afterwards unless --keep.

Each side runs in a subprocess of its own, so neither disturbs the other's memory figure:
- llama.cpp through llama-cpp-python's low-level API: a context per thread count (n_batch >= P,
  so the prompt is one llama_decode), timed by llama.cpp's own counters (llama_perf_context,
  which llama_synchronize closes after each decode); the wall time around the decode calls is
  kept beside them in --json as a cross-check.
- tritlm through tritlm.bench.model.run (wall time around Engine.forward).
Both sides draw the same token ids (numpy's default_rng(seed), in run()'s order), keep logits of
the last prompt token only, start each run from an empty cache, and discard a first warm-up run
of every test. Peak RSS is the process's VmHWM (resident high-water mark, mapped file pages
included); it counts the Python interpreter and numpy on both sides.

The script never touches the network; every subprocess has a time limit (--timeout).
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

# the parent imports neither numpy nor tritlm nor llama_cpp: it only starts processes and prints


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", help="a TQ2_0 GGUF file both run (default: write a dummy)")
    p.add_argument("--preset", default="2B4T", help="dummy model shape, a `tritlm dummy` preset (default 2B4T)")
    p.add_argument("--embedding", default="Q6_K", choices=["F16", "Q8_0", "Q6_K"],
                   help="dummy token-embedding type (default Q6_K)")
    p.add_argument("--keep", action="store_true", help="keep the dummy model file (its path is printed)")
    p.add_argument("-p", "--n-prompt", type=int, nargs="+", default=[128], help="prompt lengths (default 128)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="tokens to generate (default 128; 0: none)")
    p.add_argument("-t", "--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    p.add_argument("-r", "--repetitions", type=int, default=3,
                   help="timed runs per test, after one warm-up run (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the token ids (default 0)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds each subprocess may take (default 3600)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    p.add_argument("-v", "--verbose", action="store_true", help="pass the subprocesses' logs through to stderr")
    p.add_argument("--worker", choices=["llama", "tritlm"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.threads) < 1 or min(args.n_prompt) < 1 or args.n_gen < 0 or args.repetitions < 1:
        parser.error("threads, prompt lengths and repetitions must be positive, -n non-negative")
    return args


# ---------------------------------------------------------------------------------- subprocesses

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


def _rate_row(test: str, threads: int, rates: list[float]) -> dict:
    # population std, as tritlm.bench.model reports it
    return {"test": test, "threads": threads, "tokens_per_s": statistics.fmean(rates),
            "std": statistics.pstdev(rates), "runs": rates}


def llama_worker(path: str, prompts, n_gen: int, threads, repeats: int, seed: int) -> dict:
    import ctypes

    import llama_cpp as ll
    import numpy as np

    problems, last_level, text_log = [], [0], []

    @ll.llama_log_callback
    def log(level: int, text: bytes, _user) -> None:
        """llama.cpp's log to stderr, its warnings and errors also kept to explain a refusal."""
        level = last_level[0] if level == 5 else level  # 5: the previous message continues
        last_level[0] = level
        message = text.decode(errors="replace")
        sys.stderr.write(message)
        text_log.append(message)
        if level in (3, 4) and message.strip():  # ggml.h: NONE, DEBUG, INFO, WARN (3), ERROR (4), CONT
            problems.append(message.strip())

    ll.llama_log_set(log, ctypes.c_void_p(0))
    ll.llama_backend_init()
    start = time.perf_counter()
    mparams = ll.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = ll.llama_model_load_from_file(os.fsencode(path), mparams)
    if not model:
        raise RuntimeError("llama.cpp refused to load the model; its warnings and errors:\n"
                           + "\n".join(problems or ["(none logged)"]))
    load_seconds = time.perf_counter() - start
    vocab_size = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
    rng = np.random.default_rng(seed)  # the draws tritlm.bench.model.run makes, in its order
    n_ctx = max(max(prompts, default=1), n_gen + 1)
    rows, timers = [], set()

    def timed(ctx, ids: list[int], one_at_a_time: bool) -> tuple[float, float]:
        """Tokens/s of one run from an empty cache: by llama.cpp's own timer (by the wall time
        where its counts do not add up), and by the wall time."""
        ll.llama_memory_clear(ll.llama_get_memory(ctx), True)
        ll.llama_perf_context_reset(ctx)
        chunks = [[t] for t in ids] if one_at_a_time else [ids]
        arrays = [(ll.llama_token * len(c))(*c) for c in chunks]
        begin = time.perf_counter()
        for array in arrays:
            if ll.llama_decode(ctx, ll.llama_batch_get_one(array, len(array))) != 0:
                raise RuntimeError("llama_decode failed")
            ll.llama_synchronize(ctx)  # closes llama.cpp's timer of this decode
        wall = time.perf_counter() - begin
        perf = ll.llama_perf_context(ctx)
        ms, n = (perf.t_eval_ms, perf.n_eval) if one_at_a_time else (perf.t_p_eval_ms, perf.n_p_eval)
        if n == len(ids) and ms > 0:
            timers.add("llama_perf_context")
            return n / (ms / 1e3), len(ids) / wall
        timers.add("wall")
        return len(ids) / wall, len(ids) / wall

    def measure(ctx, test: str, n: int, length: int, one_at_a_time: bool) -> dict:
        runs = [timed(ctx, rng.integers(0, vocab_size, length).tolist(), one_at_a_time)
                for _ in range(repeats + 1)][1:]  # the first run warms caches and pages
        return _rate_row(test, n, [r for r, _ in runs]) | {"wall_tokens_per_s": statistics.fmean(w for _, w in runs)}

    for n in threads:
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = max(max(prompts, default=1), 1)  # each prompt in one llama_decode
        cparams.n_ubatch = min(cparams.n_batch, 512)  # llama.cpp's default micro-batch
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = n
        cparams.no_perf = False
        ctx = ll.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError("llama_init_from_model failed")
        for p in prompts:
            rows.append(measure(ctx, f"pp{p}", n, p, False))
        if n_gen:
            rows.append(measure(ctx, f"tg{n_gen}", n, n_gen, True))
        ll.llama_free(ctx)
    ll.llama_model_free(model)
    flags = ll.llama_print_system_info().decode().strip()
    text = "".join(text_log)
    # flash attention is "auto" by default: whether the graphs llama.cpp reserved use it
    flash = "used" if "FLASH_ATTN_EXT" in text else "not used" if "graph_reserve" in text else "unknown"
    return {"engine": "llama.cpp", "version": f"llama-cpp-python {ll.__version__}", "timer": "+".join(sorted(timers)),
            "system_info": flags, "flash_attention": flash, "log_warnings": problems,
            "load_seconds": load_seconds, "peak_rss_mb": peak_rss_mb(), "rows": rows}


def tritlm_worker(path: str, prompts, n_gen: int, threads, repeats: int, seed: int) -> dict:
    import tritlm
    from tritlm.bench import model

    report = model.run(path, prompts=tuple(prompts), n_gen=n_gen, threads=tuple(threads), repeats=repeats, seed=seed)
    report["bench_peak_rss_mb"] = report.pop("peak_rss_mb")  # its ru_maxrss
    return report | {"engine": "tritlm", "version": f"tritlm {tritlm.__version__}", "timer": "wall",
                     "peak_rss_mb": peak_rss_mb()}


WORKERS = {"llama": llama_worker, "tritlm": tritlm_worker}


def run_worker(args) -> int:
    """One side's measurements, or why there are none, as JSON in the --result file."""
    try:
        result = WORKERS[args.worker](args.model, args.n_prompt, args.n_gen, args.threads, args.repetitions,
                                      args.seed)
    except Exception as e:  # reported by the parent, with this process's log
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    Path(args.result).write_text(json.dumps(result))
    return 1 if "error" in result else 0


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


def spawn(kind: str, args, timeout: float | None = None) -> dict:
    """Run one side in a fresh interpreter and return its JSON result, with how many cores the
    machine's other processes kept busy meanwhile (a noise gauge: on a 2-core machine, anything
    near 1 spoils the 2-thread figures)."""
    busy, mine, start = cpu_busy_seconds(), children_cpu_seconds(), time.perf_counter()
    report = _spawn(kind, args, timeout)
    wall, busy_after = time.perf_counter() - start, cpu_busy_seconds()
    if busy is not None and busy_after is not None and wall > 0:
        others = (busy_after - busy) - (children_cpu_seconds() - mine)
        report["other_cores_busy"] = max(others, 0.0) / wall
    report["seconds"] = wall
    return report


def _spawn(kind: str, args, timeout: float | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="vs_llama_cpp-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--result", str(result),
               "--model", args.model, "-p", *map(str, args.n_prompt), "-n", str(args.n_gen),
               "-t", *map(str, args.threads), "-r", str(args.repetitions), "--seed", str(args.seed)]
        rc, log = _run(cmd, timeout or args.timeout, args.verbose, check=False)
        report = json.loads(result.read_text()) if result.exists() else {}
        if "error" in report:
            raise WorkerError(f"the {kind} side failed: {report['error']}\n{explain_failure(log, hits=False)}")
        if rc or not report:
            raise WorkerError(f"the {kind} subprocess exited with {rc} and no result\n{explain_failure(log)}")
        return report


def _run(cmd: list[str], timeout: float, verbose: bool, check: bool = True) -> tuple[int, str]:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if verbose else subprocess.STDOUT,
                              text=True, errors="replace", timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise WorkerError(f"{' '.join(cmd[:4])} ... ran past {timeout:.0f} s\n{explain_failure(out)}") from None
    if verbose:
        sys.stderr.write(done.stdout)
    if check and done.returncode:
        raise WorkerError(f"{' '.join(cmd[:4])} ... exited with {done.returncode}\n{explain_failure(done.stdout)}")
    return done.returncode, done.stdout


def explain_failure(log: str, tail: int = 25, hits: bool = True) -> str:
    """The lines of a subprocess's log that name a problem (hits), then its last lines."""
    lines = log.splitlines()
    keys = ("error", "failed", "invalid", "unknown", "missing", "not a multiple", "not supported", "unsupported")
    found = [l for l in lines if any(k in l.lower() for k in keys)] if hits else []
    parts = (["lines naming the problem:", *found[-15:], ""] if found else []) + [f"its last {tail} log lines:",
                                                                                  *lines[-tail:]]
    return "\n".join("    " + l for l in parts)


def write_dummy(path: str, preset: str, embedding: str, timeout: float) -> None:
    """`tritlm dummy` in a subprocess of its own, so this process never imports tritlm."""
    cmd = [sys.executable, "-c", "import sys; from tritlm.cli import main; sys.exit(main(sys.argv[1:]))",
           "dummy", "-o", path, "--preset", preset, "--arch", "bitnet", "--type", "TQ2_0", "--embedding", embedding]
    _run(cmd, timeout, False)  # raises WorkerError with the log where it fails


# ---------------------------------------------------------------------------------- the report

def combine(llama: dict, tritlm: dict) -> list[dict]:
    """One row per (test, threads) either side measured: both rates and tritlm / llama.cpp."""
    a = {(r["test"], r["threads"]): r for r in llama["rows"]}
    b = {(r["test"], r["threads"]): r for r in tritlm["rows"]}
    keys = list(a) + [k for k in b if k not in a]
    rows = []
    for key in keys:
        x, y = a.get(key), b.get(key)
        ratio = y["tokens_per_s"] / x["tokens_per_s"] if x and y and x["tokens_per_s"] > 0 else math.nan
        rows.append({"test": key[0], "threads": key[1],
                     "llama_cpp": _rate(x), "tritlm": _rate(y), "ratio": ratio})
    return rows


def _rate(row: dict | None) -> dict | None:
    return None if row is None else {"tokens_per_s": row["tokens_per_s"], "std": row["std"]}


def _cell(rate: dict | None) -> str:
    return "—" if rate is None else f"{rate['tokens_per_s']:.2f} ± {rate['std']:.2f}"


def markdown(report: dict) -> str:
    llama, trit = report["llama_cpp"], report["tritlm"]
    lines = [f"model: {report['model']} ({report['description']}); {report['repetitions']} runs per test "
             f"after a warm-up",
             f"llama.cpp: {llama['version']}, timer {llama['timer']}, flash attention "
             f"{llama.get('flash_attention', 'unknown')}; tritlm: {trit['version']}, timer {trit['timer']}",
             "",
             "| test | threads | llama.cpp tok/s | tritlm tok/s | tritlm / llama.cpp |",
             "|---|---|---|---|---|"]
    for r in report["rows"]:
        ratio = "—" if math.isnan(r["ratio"]) else f"{r['ratio']:.2f}×"
        lines.append(f"| {r['test']} | {r['threads']} | {_cell(r['llama_cpp'])} | {_cell(r['tritlm'])} | {ratio} |")
    mem = report.get("peak_rss_mb") or {}
    if mem:
        parts = [f"{name} {mb:.0f} MB" for name, mb in mem.items() if mb is not None]
        lines += ["", "peak RSS (VmHWM of each side's process: load, then every test): " + ", ".join(parts)]
    lines.append(f"load: llama.cpp {llama['load_seconds']:.2f} s (mmap: weights page in on first use), "
                 f"tritlm {trit['load_seconds']:.2f} s")
    if "other_cores_busy" in llama and "other_cores_busy" in trit:
        lines.append(f"other processes kept {llama['other_cores_busy']:.2f} cores busy on average while llama.cpp "
                     f"ran, {trit['other_cores_busy']:.2f} while tritlm ran (of {os.cpu_count()})")
        if max(llama["other_cores_busy"], trit["other_cores_busy"]) > 0.25:
            lines.append("WARNING: the machine was not idle; figures at thread counts that need the busy cores "
                         "(spinning thread pools wait on a descheduled thread) are not to be trusted")
    return "\n".join(lines)


def compare(args) -> dict:
    """The whole comparison: dummy (unless --model), the llama.cpp side, then tritlm's."""
    made = None
    if not args.model:
        fd, made = tempfile.mkstemp(prefix=f"vs_llama_cpp-{args.preset}-tq2_0-", suffix=".gguf")
        os.close(fd)
        args.model = made
        write_dummy(made, args.preset, args.embedding, args.timeout)
        description = f"`tritlm dummy --preset {args.preset} --arch bitnet --type TQ2_0 --embedding {args.embedding}`"
    else:
        description = "given with --model"
    try:
        llama = spawn("llama", args)
        trit = spawn("tritlm", args)
    finally:
        if made and not args.keep:
            os.unlink(made)
    return {"model": args.model + (" (deleted)" if made and not args.keep else ""), "description": description,
            "prompts": args.n_prompt, "n_gen": args.n_gen, "threads": args.threads,
            "repetitions": args.repetitions, "seed": args.seed,
            "rows": combine(llama, trit), "llama_cpp": llama, "tritlm": trit,
            "peak_rss_mb": {"llama.cpp": llama["peak_rss_mb"], "tritlm": trit["peak_rss_mb"]}}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    try:
        report = compare(args)
    except WorkerError as e:
        print(f"vs_llama_cpp: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
