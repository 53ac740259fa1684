"""Kernel benchmark: weight streaming (GEMV) against the machine's read bandwidth, and GEMM
throughput, at the BitNet-b1.58-2B-4T matrix shapes.

Bandwidth-bound numbers only mean something when the data comes from DRAM, so every GEMV pass
walks a set of distinct copies of the matrix at least `stream_bytes` large (this machine class
has up to 260 MB of L3), the way a decode step walks every layer.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np

from .. import _native, kernels
from ..quant import layouts

# out x in of the 2B4T projections: q/o, k/v, gate/up, down
SHAPES_2B4T = ((2560, 2560), (640, 2560), (6912, 2560), (2560, 6912))


@dataclass
class Row:
    kernel: str  # "read", "read mmap", "gemv" or "gemm"
    shape: str
    threads: int
    seconds: float  # best pass
    gbps: float | None = None  # bytes streamed per second / 1e9
    gmacs: float | None = None  # multiply-adds per second / 1e9
    of_read: float | None = None  # gbps / read bandwidth at the same thread count


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm up: page faults, thread start, caches of the code
    return min(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_bandwidth(buffer: np.ndarray, threads: int, isa: str, repeats: int) -> float:
    """Bytes per second of a vectorized read of the whole buffer (the roofline for decode)."""
    _native.read_seconds(buffer, isa, threads)
    return buffer.nbytes / min(_native.read_seconds(buffer, isa, threads) for _ in range(repeats))


def run(shapes=SHAPES_2B4T, threads=(1, 2), tokens: int = 128, stream_bytes: int = 1 << 30,
        repeats: int = 7, isa: str | None = None, seed: int = 0) -> list[Row]:
    isa = isa or kernels.default_isa()
    rng = np.random.default_rng(seed)
    rows: list[Row] = []

    buffer = _native.empty_streaming(stream_bytes)
    buffer[:] = rng.integers(0, 256, stream_bytes, dtype=np.uint8)
    read = {}
    for n in threads:
        read[n] = read_bandwidth(buffer, n, isa, repeats)
        rows.append(Row("read", f"{stream_bytes >> 20} MiB", n, stream_bytes / read[n], gbps=read[n] / 1e9))
    # The other place weights could live: a file's pages, memory-mapped (4 KiB pages, in the page
    # cache). The engine keeps its weights in huge pages; this row says what that is worth.
    with tempfile.TemporaryFile() as f:
        buffer.tofile(f)
        f.flush()
        mapped = np.memmap(f, np.uint8, "r", shape=(stream_bytes,))
        for n in threads:
            gbps = read_bandwidth(mapped, n, isa, repeats)
            rows.append(Row("read mmap", f"{stream_bytes >> 20} MiB", n, stream_bytes / gbps, gbps=gbps / 1e9,
                            of_read=gbps / read[n]))
        del mapped
    del buffer

    for m, k in shapes:
        tiles = layouts.pack_tiles(rng.integers(-1, 2, (m, k)).astype(np.int8))
        copies = -(-stream_bytes // tiles.nbytes)
        stream = _native.empty_streaming(copies * tiles.nbytes).reshape(copies, *tiles.shape)
        stream[:] = tiles
        scale = np.ones(m, np.float32)
        matrices = [_native.Weights(weights, m, scale) for weights in stream]
        matrix = matrices[0]
        one = kernels.quantize_activations(rng.standard_normal((1, k)).astype(np.float32))
        many = kernels.quantize_activations(rng.standard_normal((tokens, k)).astype(np.float32))

        for n in threads:
            def gemv_pass():
                for weights in matrices:
                    _native.gemm(weights, one, isa, n)

            t = best_seconds(gemv_pass, repeats)
            gbps = stream.nbytes / t
            rows.append(Row("gemv", f"{m}x{k}", n, t / copies, gbps=gbps / 1e9, of_read=gbps / read[n]))

        for n in threads:
            t = best_seconds(lambda: _native.gemm(matrix, many, isa, n), repeats)
            rows.append(Row("gemm", f"{m}x{k}x{tokens}", n, t, gmacs=m * k * tokens / t / 1e9))
        del matrices, matrix, stream
    return rows


def markdown(rows: list[Row], isa: str) -> str:
    lines = [f"kernel set: {isa}", "",
             "| kernel | shape | threads | time | GB/s | GMAC/s | of read bandwidth |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.shape} | {r.threads} | {_time(r.seconds)} | "
                     f"{_num(r.gbps)} | {_num(r.gmacs)} | {_pct(r.of_read)} |")
    return "\n".join(lines)


def as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.0%}"
