"""llama.cpp against tritlm on the very same TQ2_0 GGUF file: prompt processing (pp, the P prompt
tokens in one forward) and generation (tg, N tokens one at a time) tokens/s for each thread
count, side by side, with the ratio tritlm / llama.cpp.

    pip install 'tritlm[bench]'   # llama-cpp-python
    python benchmarks/vs_llama_cpp.py --preset 2B4T -p 128 -n 128 -t 1 2 -r 3 [--isa avx2]

Without --model it writes a random-weight model with `tritlm dummy --arch bitnet --type TQ2_0`
(the architecture name and the ternary layout llama.cpp reads) under the system temporary
directory, and deletes it afterwards unless --keep.

Each side runs in a subprocess of its own, so neither disturbs the other's memory figure:
- llama.cpp through llama-cpp-python's low-level API: a context per thread count (n_batch >= P,
  so the prompt is one llama_decode), timed by llama.cpp's own counters (llama_perf_context,
  which llama_synchronize closes after each decode); the wall time around the decode calls is
  kept beside them in --json as a cross-check.
- tritlm through tritlm.bench.model.run (wall time around Engine.forward), with
  TRITLM_ISA=--isa where given.
Both sides draw the same token ids (numpy's default_rng(seed), in run()'s order), keep logits of
the last prompt token only, start each run from an empty cache, and discard a first warm-up run
of every test. Peak RSS is the process's VmHWM (resident high-water mark, mapped file pages
included); it counts the Python interpreter and numpy on both sides.

The script never touches the network; every subprocess has a time limit (--timeout).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _peers  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _peers.add_common_arguments(p, "a TQ2_0 GGUF file both run (default: write a dummy)", WORKERS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    return _peers.check_arguments(parser, parser.parse_args(argv))


# ---------------------------------------------------------------------------------- subprocesses

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
        return (_peers.rate_row(test, n, [r for r, _ in runs])
                | {"wall_tokens_per_s": statistics.fmean(w for _, w in runs)})

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
            "load_seconds": load_seconds, "peak_rss_mb": _peers.peak_rss_mb(), "rows": rows}


WORKERS = {"llama": llama_worker, "tritlm": _peers.tritlm_worker}


def spawn(kind: str, args) -> dict:
    """One side, every test, in a fresh interpreter, with how many cores the machine's other
    processes kept busy meanwhile."""
    report, wall, others = _peers.gauged(lambda: _peers.spawn_worker(__file__, kind, args))
    if others is not None and wall > 0:
        report["other_cores_busy"] = others / wall
    report["seconds"] = wall
    return report


# ---------------------------------------------------------------------------------- the report

def combine(llama: dict, tritlm: dict) -> list[dict]:
    return _peers.combine(llama, tritlm, "llama_cpp")


def markdown(report: dict) -> str:
    llama, trit = report["llama_cpp"], report["tritlm"]
    lines = [f"model: {report['model']} ({report['description']}); {report['repetitions']} runs per test "
             f"after a warm-up",
             f"llama.cpp: {llama['version']}, timer {llama['timer']}, flash attention "
             f"{llama.get('flash_attention', 'unknown')}; tritlm: {trit['version']}, ISA {trit.get('isa', 'unknown')}, "
             f"timer {trit['timer']}",
             "", *_peers.table(report["rows"], "llama_cpp", "llama.cpp")]
    mem = report.get("peak_rss_mb") or {}
    if mem:
        parts = [f"{name} {mb:.0f} MB" for name, mb in mem.items() if mb is not None]
        lines += ["", "peak RSS (VmHWM of each side's process: load, then every test): " + ", ".join(parts)]
    lines.append(f"load: llama.cpp {llama['load_seconds']:.2f} s (mmap: weights page in on first use), "
                 f"tritlm {trit['load_seconds']:.2f} s")
    lines += _peers.noise_lines("llama.cpp", llama, trit)
    return "\n".join(lines)


def compare(args) -> dict:
    """The whole comparison: dummy (unless --model), the llama.cpp side, then tritlm's."""
    made, description = _peers.dummy_model(args, "bitnet", "TQ2_0")  # llama.cpp's architecture name and layout
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
    return _peers.main("vs_llama_cpp", parse_args(argv), WORKERS, compare, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
