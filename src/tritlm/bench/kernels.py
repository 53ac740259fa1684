"""Kernel benchmark: weight streaming (GEMV) against the machine's read bandwidth, and GEMM
throughput, at the BitNet-b1.58-2B-4T matrix shapes, for each weight layout: `tiles` (2 bits per
weight) and `tiles5` (1.625 bits per weight, K a multiple of 256).

Bandwidth-bound numbers only mean something when the data comes from DRAM, so every GEMV pass
walks a set of distinct copies of the matrix at least `stream_bytes` large (this machine class
has up to 260 MB of L3), the way a decode step walks every layer. The layouts are timed in
alternation, pass by pass, so that a machine shared with other work slows both alike.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np

from .. import _native, kernels
from ..quant import layouts

# out x in of the 2B4T matrices as the engine streams them: q, k and v stacked; o; gate and up
# stacked; down
SHAPES_2B4T = ((3840, 2560), (2560, 2560), (13824, 2560), (2560, 6912))
LAYOUTS = {"tiles": layouts.pack_tiles, "tiles5": layouts.pack_tiles5}


@dataclass
class Row:
    kernel: str  # "read", "read mmap", "gemv" or "gemm"
    shape: str
    threads: int
    seconds: float  # best pass (per matrix for gemv)
    layout: str = ""  # weight layout of gemv and gemm rows
    gbps: float | None = None  # bytes streamed per second / 1e9
    gweights: float | None = None  # weights streamed per second / 1e9
    gmacs: float | None = None  # multiply-adds per second / 1e9
    of_read: float | None = None  # gbps / read bandwidth at the same thread count
    vs_tiles: float | None = None  # seconds / seconds of the 2-bit layout, same shape and threads


def best_seconds(fn, repeats: int) -> float:
    return best_seconds_each([fn], repeats)[0]


def best_seconds_each(fns, repeats: int) -> list[float]:
    """Best of `repeats` passes of each function, the functions taking turns."""
    for fn in fns:
        fn()  # warm up: page faults, thread start, caches of the code
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], _timed(fn))
    return best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_bandwidth(buffer: np.ndarray, threads: int, isa: str, repeats: int) -> float:
    """Bytes per second of a vectorized read of the whole buffer (the roofline for decode)."""
    _native.read_seconds(buffer, isa, threads)
    return buffer.nbytes / min(_native.read_seconds(buffer, isa, threads) for _ in range(repeats))


def _streamed(tiles: np.ndarray, m: int, stream_bytes: int, layout: str) -> list:
    """Distinct copies of the tiles, at least stream_bytes in all, as native weights."""
    copies = -(-stream_bytes // tiles.nbytes)
    stream = _native.empty_streaming(copies * tiles.nbytes).reshape(copies, *tiles.shape)
    stream[:] = tiles
    scale = np.ones(m, np.float32)
    return [_native.Weights(weights, m, scale, layout) for weights in stream]


def run(shapes=SHAPES_2B4T, threads=(1, 2), tokens: int = 128, stream_bytes: int = 1 << 30,
        repeats: int = 7, isa: str | None = None, seed: int = 0,
        layout_names=tuple(LAYOUTS), progress=None) -> list[Row]:
    """The measurements, as rows; progress(row) is called after each (it takes minutes)."""
    isa = isa or kernels.default_isa()
    rng = np.random.default_rng(seed)
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        if progress:
            progress(row)

    buffer = _native.empty_streaming(stream_bytes)
    buffer[:] = rng.integers(0, 256, stream_bytes, dtype=np.uint8)
    read = {}
    for n in threads:
        read[n] = read_bandwidth(buffer, n, isa, repeats)
        add(Row("read", f"{stream_bytes >> 20} MiB", n, stream_bytes / read[n], gbps=read[n] / 1e9))
    # The other place weights could live: a file's pages, memory-mapped (4 KiB pages, in the page
    # cache). The engine keeps its weights in huge pages; this row says what that is worth.
    with tempfile.TemporaryFile() as f:
        buffer.tofile(f)
        f.flush()
        mapped = np.memmap(f, np.uint8, "r", shape=(stream_bytes,))
        for n in threads:
            gbps = read_bandwidth(mapped, n, isa, repeats)
            add(Row("read mmap", f"{stream_bytes >> 20} MiB", n, stream_bytes / gbps, gbps=gbps / 1e9,
                    of_read=gbps / read[n]))
        del mapped
    del buffer

    for m, k in shapes:
        ternary = rng.integers(-1, 2, (m, k)).astype(np.int8)
        names = [name for name in layout_names if name != "tiles5" or k % layouts.TILES5_BLOCK == 0]
        tiles = {name: LAYOUTS[name](ternary) for name in names}
        matrices = {name: _streamed(tiles[name], m, stream_bytes, name) for name in names}
        one = kernels.quantize_activations(rng.standard_normal((1, k)).astype(np.float32))
        many = kernels.quantize_activations(rng.standard_normal((tokens, k)).astype(np.float32))

        def gemv_pass(name, n):
            def run_pass():
                for weights in matrices[name]:
                    _native.gemm(weights, one, isa, n)
            return run_pass

        for n in threads:
            seconds = best_seconds_each([gemv_pass(name, n) for name in names], repeats)
            for name, t in zip(names, seconds):
                per_matrix = t / len(matrices[name])
                gbps = tiles[name].nbytes / per_matrix
                add(Row("gemv", f"{m}x{k}", n, per_matrix, name, gbps=gbps / 1e9,
                        gweights=m * k / per_matrix / 1e9, of_read=gbps / read[n],
                        vs_tiles=per_matrix / (seconds[0] / len(matrices[names[0]]))
                        if names[0] == "tiles" and name != "tiles" else None))

        for n in threads:
            seconds = best_seconds_each(
                [lambda name=name: _native.gemm(matrices[name][0], many, isa, n) for name in names], repeats)
            for name, t in zip(names, seconds):
                add(Row("gemm", f"{m}x{k}x{tokens}", n, t, name, gmacs=m * k * tokens / t / 1e9,
                        vs_tiles=t / seconds[0] if names[0] == "tiles" and name != "tiles" else None))
        matrices.clear()  # free this shape's streams before the next shape's
    return rows


def markdown(rows: list[Row], isa: str) -> str:
    lines = [f"kernel set: {isa}", "",
             "| kernel | layout | shape | threads | time | GB/s | Gweights/s | GMAC/s | of read bandwidth "
             "| time vs tiles |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.layout} | {r.shape} | {r.threads} | {_time(r.seconds)} | "
                     f"{_num(r.gbps)} | {_num(r.gweights)} | {_num(r.gmacs)} | {_pct(r.of_read)} | "
                     f"{'' if r.vs_tiles is None else f'{r.vs_tiles:.2f}'} |")
    return "\n".join(lines)


def as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.0%}"
