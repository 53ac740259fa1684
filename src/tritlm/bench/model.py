"""Whole-model benchmark, llama-bench's job: prompt processing (pp) and generation (tg) speed,
with the decode roofline: bytes read per token / tg time, over the read bandwidth the same run
measures by reading the engine's own weights (the very pages decode streams, and no extra
memory in the peak RSS). With speculative decoding asked for (`lookup`, `draft`): greedy decoding
after a text whose continuation repeats it, plain and speculative, with the share of guesses
accepted."""

from __future__ import annotations

import resource
import time

import numpy as np

from .. import kernels
from ..api import LLM
from ..runtime import Engine
from .kernels import read_bandwidth

# The default text for speculative decoding: a class, then the start of the same class again,
# as when a model is asked to quote or edit code it was given.
REPEATING_TEXT = '''\
class Stack:
    """A last-in, first-out stack of items."""

    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

    def __len__(self):
        return len(self.items)


class Stack:
'''


def run(path, *, prompts=(128,), n_gen: int = 128, threads=(2,), repeats: int = 3,
        seed: int = 0, weight_layout: str | None = None, mmap: bool = False,
        lookup: int | None = None, draft: str | None = None, text: str = REPEATING_TEXT) -> dict:
    """lookup: also decode greedily after `text` with prompt lookup (up to `lookup` guesses a
    step); draft: with this draft model; both beside plain decoding of the same text."""
    start, read_before = time.perf_counter(), _bytes_read()
    speculative = [("lookup", lookup)] * bool(lookup) + [("draft", 8)] * bool(draft)
    n_ctx = max(max(prompts, default=1), n_gen + 1)
    if speculative and n_ctx <= 4096:
        n_ctx = None  # the model's context, up to 4096: room for the text
    llm = LLM(path, n_ctx=n_ctx, weight_layout=weight_layout, mmap=mmap, draft_model=draft)
    engine, config = llm.engine, llm.config
    load_seconds = time.perf_counter() - start
    load_read = None if read_before is None else _bytes_read() - read_before
    rng = np.random.default_rng(seed)
    rows, speculative_rows = [], []
    for n in threads:
        engine.set_threads(n)
        if llm.draft:
            llm.draft.engine.set_threads(n)
        bandwidth = read_bandwidth(engine.weights, n, kernels.default_isa(), 3)
        for p in prompts:
            rates = [_timed_rate(engine, rng.integers(0, config.vocab_size, p).tolist(), 1)
                     for _ in range(repeats + 1)][1:]  # the first run warms caches and pages
            rows.append(_row(f"pp{p}", n, rates))
        if n_gen:
            _timed_rate(engine, rng.integers(0, config.vocab_size, n_gen).tolist(), n_gen)  # warm-up
            before = engine.op_seconds()
            rates = [_timed_rate(engine, rng.integers(0, config.vocab_size, n_gen).tolist(), n_gen)
                     for _ in range(repeats)]
            row = _row(f"tg{n_gen}", n, rates)
            row["roofline"] = engine.decode_bytes * row["tokens_per_s"] / bandwidth
            row["read_gbps"] = bandwidth / 1e9
            row["step_ms"] = {op: (t - before[op]) * 1e3 / (repeats * n_gen) for op, t in engine.op_seconds().items()}
            rows.append(row)
        if speculative:
            speculative_rows += _speculative_rows(llm, text, n_gen, n, repeats, speculative)
    layouts = sorted({m.layout for layer in engine.layers for m in layer.matrices})
    return {"model": str(path), "arch": config.arch, "weight_layout": "+".join(layouts),
            "weight_cache": engine.weight_cache and str(engine.weight_cache),
            "decode_mb_per_token": engine.decode_bytes / 1e6, "head_mb": engine.head.nbytes / 1e6,
            "load_seconds": load_seconds, "load_read_mb": None if load_read is None else load_read / 1e6,
            "peak_rss_mb": _peak_rss_mb(), "rows": rows, "speculative_rows": speculative_rows}


def _speculative_rows(llm: LLM, text: str, n_gen: int, threads: int, repeats: int, modes) -> list[dict]:
    """Greedy decoding of n_gen tokens after `text`, plain and in each speculative mode (name, max
    guesses): tokens/s, the ratio to plain, guesses proposed and accepted, and whether the text
    came out the same (it must)."""
    def decode(mode, guesses):
        out = llm.generate(text, max_tokens=n_gen, temperature=0, ignore_eos=True, speculative=mode,
                           max_guesses=guesses)
        t = llm.timings
        return out, (t["generated_tokens"] - 1) / t["decode_seconds"], t

    rows = []
    for mode, guesses in [(None, 8)] + modes:
        runs = [decode(mode, guesses) for _ in range(repeats + 1)][1:]  # the first warms up
        row = _row(f"tg{n_gen} {mode or 'plain'}", threads, [rate for _, rate, _ in runs])
        if mode is None:
            plain_text, plain_rate = runs[0][0], row["tokens_per_s"]
        else:
            t = runs[-1][2]
            row |= {"max_guesses": guesses, "proposed": t["proposed_tokens"], "accepted": t["accepted_tokens"],
                    "speedup": row["tokens_per_s"] / plain_rate, "same_text": all(r[0] == plain_text for r in runs)}
        rows.append(row)
    return rows


def _bytes_read() -> int | None:
    """Bytes this process has read so far (Linux: /proc/self/io rchar, every read call, from the
    disk or the page cache); None elsewhere."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except (OSError, StopIteration, ValueError):
        return None


def _timed_rate(engine: Engine, tokens: list[int], steps: int) -> float:
    """Tokens/s: the tokens in one forward (steps=1, prefill) or one at a time (decode)."""
    seq = engine.new_sequence(n_ctx=len(tokens))
    start = time.perf_counter()
    if steps == 1:
        engine.forward([(seq, tokens)])
    else:
        for t in tokens:
            engine.forward([(seq, [t])])
    return len(tokens) / (time.perf_counter() - start)


def _row(test: str, threads: int, rates: list[float]) -> dict:
    return {"test": test, "threads": threads, "tokens_per_s": float(np.mean(rates)),
            "std": float(np.std(rates))}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def markdown(report: dict) -> str:
    lines = [f"model: {report['model']} ({report['arch']}, weights in {report['weight_layout']}), "
             f"{report['decode_mb_per_token']:.0f} MB "
             f"read per generated token; load {report['load_seconds']:.1f} s"
             + (f" ({report['load_read_mb']:.0f} MB read)" if report.get("load_read_mb") is not None else "")
             + f", peak RSS {report['peak_rss_mb']:.0f} MB"
             + (f"; weights mapped from {report['weight_cache']}" if report.get("weight_cache") else ""), "",
             "| test | threads | tokens/s | roofline |", "|---|---|---|---|"]
    for r in report["rows"]:
        roof = f"{r['roofline']:.0%} of {r['read_gbps']:.1f} GB/s" if "roofline" in r else ""
        lines.append(f"| {r['test']} | {r['threads']} | {r['tokens_per_s']:.2f} ± {r['std']:.2f} | {roof} |")
    steps = [r for r in report["rows"] if "step_ms" in r]
    if steps:
        head_bytes = report["head_mb"] / report["decode_mb_per_token"]
        lines += ["", f"Where a decode step goes, ms per token (share); the head is {head_bytes:.0%} of the bytes read:",
                  "", "| threads | ternary | head | attention | other |", "|---|---|---|---|---|"]
        for r in steps:
            total = sum(r["step_ms"].values())
            cells = [f"{ms:.2f} ({ms / total:.0%})" for ms in r["step_ms"].values()]
            lines.append(f"| {r['threads']} | " + " | ".join(cells) + " |")
    if report["speculative_rows"]:
        lines += ["", "Speculative decoding, greedy, after a text that its continuation repeats:", "",
                  "| test | threads | tokens/s | × plain | accepted / proposed | same text |", "|---|---|---|---|---|---|"]
        for r in report["speculative_rows"]:
            cells = ([f"{r['speedup']:.2f}×", f"{r['accepted']} / {r['proposed']}", "yes" if r["same_text"] else "NO"]
                     if "speedup" in r else ["", "", ""])
            lines.append(f"| {r['test']} | {r['threads']} | {r['tokens_per_s']:.2f} ± {r['std']:.2f} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv(report: dict) -> str:
    lines = ["model,test,threads,tokens_per_s,std,roofline,load_seconds,peak_rss_mb"]
    for r in report["rows"]:
        lines.append(f"{report['model']},{r['test']},{r['threads']},{r['tokens_per_s']:.3f},"
                     f"{r['std']:.3f},{r.get('roofline', '')},{report['load_seconds']:.2f},"
                     f"{report['peak_rss_mb']:.0f}")
    return "\n".join(lines)
