"""`tritlm bench -m MODEL --device cuda`: the GPU engine's speed, beside what the GPU can do.

- copy: the device's measured copy bandwidth (a 2 GiB device-to-device copy, bytes read plus
  written), the ceiling the GEMV is held against;
- tg1: batch-1 decode, ms per token end to end (engine.forward: token in, NumPy logits out)
  and the device time of one captured step alone;
- pp{n}: prefill tokens/s of an n-token prompt;
- tg x B: aggregate decode tokens/s of B sequences advancing together (logits of all of them
  copied to the host every step, as the server needs them), and the device time of one replay
  of that batch's captured step;
- gemv: each of a layer's ternary matrices times one token, over all the layers' copies of it
  (so the weights stream from memory, not L2), GB/s of the words read and % of copy bandwidth;
  beside torch's bf16 F.linear of the same shape (random weights, as many copies), the GPU
  kernel a user would run instead;
- bf16 step: the sum over the model's linears and LM head of those bf16 times: a lower bound
  on a bf16 engine's decode step, against tritlm's whole step (the graph replay);
- kernels x B: device time per kernel of one decode step of B sequences (torch.profiler, the
  step run without its graph): where the time goes.

Device times come from CUDA graphs replayed between CUDA events (median of the replays), so
launch gaps do not count. The report so far goes to stderr after each stage (a run cut short
keeps what it measured).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..cuda import kernels as K
from ..cuda.engine import CudaEngine
from ..models import loader

KEYS = ("qkv", "attn_output", "gate_up", "ffn_down")


def event_seconds(fn, repeats: int = 20) -> float:
    """Median device seconds of fn (after 3 warm-up calls), between CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(np.median(times))


def graph_seconds(fn, repeats: int = 20) -> float:
    """Median device seconds of fn's kernels, captured once in a CUDA graph and replayed."""
    fn()  # compile, allocate
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return event_seconds(graph.replay, repeats)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    seconds = event_seconds(lambda: b.copy_(a), 10)
    del a, b
    return 2 * nbytes / seconds


def run(path, *, prompts=(512,), n_gen: int = 64, batches=(8, 64, 256), device: str = "cuda", seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    config, tensors, _ = loader.load(path)
    n_ctx = max(max(prompts, default=1), 16 + n_gen) + 1
    engine = CudaEngine(config, tensors, n_ctx=n_ctx, prefill_chunk=max(prompts, default=256), device=device)
    del tensors
    torch.cuda.synchronize()
    report = {"model": str(path), "arch": config.arch, "load_seconds": time.perf_counter() - start,
              "decode_mb_per_token": engine.decode_bytes / 1e6, "device": torch.cuda.get_device_name()}
    bandwidth = report["copy_gbps"] = copy_bandwidth() / 1e9
    tokens = lambda n: rng.integers(0, config.vocab_size, n).tolist()  # noqa: E731

    # batch-1 decode: end to end, then the captured step alone
    seq = engine.new_sequence()
    engine.forward([(seq, tokens(16))])
    engine.forward([(seq, tokens(1))])  # captures the graph
    torch.cuda.synchronize()
    start = time.perf_counter()
    for t in tokens(n_gen):
        engine.forward([(seq, [t])])
    report["tg1_ms"] = (time.perf_counter() - start) / n_gen * 1e3
    report["tg1_device_ms"] = event_seconds(engine._graphs[1][1].replay) * 1e3  # (rewrites one position's k, v)
    report["tg1_roofline"] = engine.decode_bytes / (report["tg1_device_ms"] / 1e3) / 1e9 / bandwidth
    progress(report)

    for p in prompts:
        rates = []
        for _ in range(3):
            seq = engine.new_sequence(n_ctx=p)
            torch.cuda.synchronize()
            start = time.perf_counter()
            engine.forward([(seq, tokens(p))])
            rates.append(p / (time.perf_counter() - start))
        report[f"pp{p}_tokens_per_s"] = max(rates[1:])  # the first compiles

    for b in batches:
        seqs = [engine.new_sequence(n_ctx=16 + 9) for _ in range(b)]
        engine.forward([(s, tokens(16)) for s in seqs])
        engine.forward([(s, tokens(1)) for s in seqs])  # compiles this batch's tiles
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(8):
            engine.forward([(s, tokens(1)) for s in seqs])
        report[f"tg_x{b}_tokens_per_s"] = 8 * b / (time.perf_counter() - start)
        graph = engine._graphs[1 << (b - 1).bit_length()][1]  # (b rounded up to a power of two)
        report[f"tg_x{b}_device_ms"] = event_seconds(graph.replay) * 1e3
        del seqs
    progress(report)

    report["kernels"] = {f"x{b}": kernel_breakdown(engine, b) for b in (1, max(batches, default=1))}
    report["gemv"] = gemv_rows(engine, bandwidth)
    head = torch.randn(config.vocab_size, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    linears_ms = sum(g["bf16_us"] for g in report["gemv"]) * config.n_layers / 1e3
    report["bf16_step_ms"] = linears_ms + graph_seconds(lambda: F.linear(x, head)) * 1e3
    return report


def progress(report: dict) -> None:
    print(f"tritlm bench (so far): {json.dumps(report)}", file=sys.stderr, flush=True)


def kernel_breakdown(engine: CudaEngine, batch: int, top: int = 10) -> list[dict]:
    """Device microseconds per kernel (and copy) of one eager decode step of `batch` sequences."""
    from torch.profiler import ProfilerActivity, profile

    seqs = [engine.new_sequence(n_ctx=32) for _ in range(batch)]
    engine.forward([(s, list(range(16))) for s in seqs])
    graph, engine.cuda_graph = engine.cuda_graph, False
    try:
        engine.forward([(s, [1]) for s in seqs])  # compiles anything new
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.forward([(s, [2]) for s in seqs])
    finally:
        engine.cuda_graph = graph
    rows = [{"name": e.key[:60], "us": e.device_time_total, "calls": e.count} for e in prof.key_averages()
            if e.device_time_total > 0]
    total = sum(r["us"] for r in rows)
    rows.sort(key=lambda r: -r["us"])
    return [{"name": "total", "us": total, "calls": sum(r["calls"] for r in rows)}] + rows[:top]


def gemv_rows(engine: CudaEngine, bandwidth: float) -> list[dict]:
    """One token through every layer's copy of each matrix shape: ternary GEMV and bf16 F.linear."""
    rows = []
    n = len(engine.layers)
    for key in KEYS:
        matrices = [getattr(layer, key) for layer in engine.layers]
        m, k = matrices[0].shape
        x = torch.randn(1, k, device="cuda")
        act = K.quantize(x, with_y=True)
        out = torch.empty(1, m, device="cuda")
        ours = graph_seconds(lambda: [K.linear(act, w, out=out) for w in matrices]) / n
        weights = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
        xb = x.to(torch.bfloat16)
        bf16 = graph_seconds(lambda: [F.linear(xb, w) for w in weights]) / n
        del weights
        gbps = matrices[0].nbytes / ours / 1e9
        rows.append({"matrix": key, "shape": f"{m}x{k}", "us": ours * 1e6, "gbps": gbps,
                     "of_copy": gbps / bandwidth, "bf16_us": bf16 * 1e6, "bf16_gbps": m * k * 2 / bf16 / 1e9,
                     "speedup_vs_bf16": bf16 / ours})
    return rows


def markdown(r: dict) -> str:
    lines = [f"model: {r['model']} ({r['arch']}) on {r['device']}: {r['decode_mb_per_token']:.0f} MB read per "
             f"token, loaded in {r['load_seconds']:.1f} s; copy bandwidth {r['copy_gbps']:.0f} GB/s", "",
             "| test | result |", "|---|---|",
             f"| tg1 (batch-1 decode, end to end) | {r['tg1_ms']:.3f} ms/token ({1e3 / r['tg1_ms']:.0f} tokens/s) |",
             f"| tg1 device time (one graph replay) | {r['tg1_device_ms']:.3f} ms "
             f"({r['tg1_roofline']:.0%} of copy bandwidth) |",
             f"| bf16 F.linear, same shapes (linears + head only) | {r['bf16_step_ms']:.3f} ms "
             f"({r['bf16_step_ms'] / r['tg1_device_ms']:.2f}x tritlm's whole step) |"]
    lines += [f"| {key.replace('_tokens_per_s', '')} | {value:.0f} tokens/s |" for key, value in r.items()
              if key.endswith("_tokens_per_s")]
    lines += [f"| {key.replace('_device_ms', '')} device time (one graph replay) | {value:.3f} ms |"
              for key, value in r.items() if key.startswith("tg_x") and key.endswith("_device_ms")]
    for name, rows in r["kernels"].items():
        lines += ["", f"| kernel (one eager step, {name}) | device us | calls |", "|---|---|---|"]
        lines += [f"| {k['name']} | {k['us']:.0f} | {k['calls']} |" for k in rows]
    lines += ["", "| matrix | shape | GEMV us | GB/s | of copy | bf16 F.linear us | bf16 GB/s | speedup |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {g['matrix']} | {g['shape']} | {g['us']:.1f} | {g['gbps']:.0f} | {g['of_copy']:.0%} | "
              f"{g['bf16_us']:.1f} | {g['bf16_gbps']:.0f} | {g['speedup_vs_bf16']:.2f}x |" for g in r["gemv"]]
    return "\n".join(lines)
