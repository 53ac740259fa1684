"""The C++ kernels, behind a checked Python API.

Weights live in `TernaryMatrix`: one copy, packed once in C++ from an int8 array or straight
from a file layout's bytes into a layout the kernels stream (see `tritlm.quant.layouts`): `tiles`
(2 bits per weight) or `tiles5` (1.625 bits, five weights per byte), in huge-page-backed memory. Activations are quantized per token by
`quantize_activations`, once per input, and the result can feed several matrices (q, k and v
read the same activations).

Every call takes `isa` (a kernel set from `ISAS`, default the best, or the `TRITLM_ISA`
environment variable) and `n_threads` (default: every CPU this process may use).
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import numpy as np

from . import _native
from .quant import layouts

ISAS: tuple[str, ...] = tuple(_native.isas())  # best first


def default_isa() -> str:
    isa = os.environ.get("TRITLM_ISA", ISAS[0])
    if isa not in ISAS:
        raise ValueError(f"TRITLM_ISA={isa!r} is not available on this CPU; available: {', '.join(ISAS)}")
    return isa


def best_layout(isa: str | None = None, k: int = 256) -> str:
    """The weight layout the kernels stream fastest here for rows of length k: `tiles5` where
    they decode it at memory speed (AVX512-VBMI) and k is a multiple of 256, else `tiles`."""
    return "tiles5" if k % 256 == 0 and _native.best_layout(isa or default_isa()) == "tiles5" else "tiles"


def default_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def idle_cores() -> int:
    """The cores this process may run on less those other work keeps busy (the 1-minute load
    average, rounded), at least one: the engine's default thread count. A thread that waits for
    a core another process holds stalls every op it shares, so a busy core is better left out."""
    cores = default_threads()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # (no load average on this system)
        return cores
    return max(1, min(cores, round(cores - load)))


# Per-token int8 activations, checked once when made: .q [tokens, K], .scale [tokens] and
# .row_sum [tokens] = sum(q). Made by quantize_activations, or from arrays by the constructor.
Activations = _native.Activations


def quantize_activations(x: np.ndarray, *, isa: str | None = None,
                         n_threads: int | None = None) -> Activations:
    """Quantize float32 activations [tokens, K] (or one token [K]) to int8, row by row."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None]
    return _native.quantize(x, isa or default_isa(), n_threads or default_threads())


class Part(NamedTuple):
    """A matrix to pack, alone or stacked with others by rows: `data` in `layout`, either "int8"
    (ternary [rows, K]) or "HF" (Hugging Face's packed uint8 [rows/4, K]), with its `scale`; or
    one of `layouts.FILE_LAYOUTS` (the file's bytes, which hold the scales)."""

    layout: str
    data: np.ndarray
    shape: tuple[int, int]
    scale: np.ndarray | float | None = None
    name: str | None = None  # a model's tensor: named in errors, and warned about if all zero


class TernaryMatrix:
    """A ternary weight matrix [M, K] (weight = ternary * scale[row]) ready for the kernels."""

    def __init__(self, ternary: np.ndarray, scale, layout: str = "tiles"):
        ternary = np.asarray(ternary)
        if ternary.dtype != np.int8 or ternary.ndim != 2:
            raise ValueError(f"ternary weights must be int8 [M, K], got {ternary.dtype} {ternary.shape}")
        self._pack([Part("int8", np.ascontiguousarray(ternary), ternary.shape, scale)], layout)

    @classmethod
    def stack(cls, parts: list[Part], layout: str = "tiles", *, out: np.ndarray | None = None,
              n_threads: int | None = None) -> TernaryMatrix:
        """One matrix of the parts stacked by rows (q, k and v: one stream over the weights),
        packed into `out` (uint8, `nbytes_of(shape, layout)` bytes) or new huge-page memory."""
        matrix = cls.__new__(cls)
        matrix._pack(parts, layout, out, n_threads)
        return matrix

    @classmethod
    def of_tiles(cls, tiles: np.ndarray, shape: tuple[int, int], layout: str, scale: np.ndarray) -> TernaryMatrix:
        """A matrix packed before (a memory-mapped weight cache): `tiles`, the `nbytes_of(shape,
        layout)` bytes `stack` wrote, and its float32 row scales [M]; both used in place."""
        matrix = cls.__new__(cls)
        matrix.shape, matrix.layout = tuple(shape), layout
        matrix.tiles = tiles.reshape(cls.tiles_shape(matrix.shape, layout))
        matrix.scale = layouts.row_scales(scale, matrix.shape[0])  # finite and non-negative, or ValueError
        matrix._weights = _native.Weights(matrix.tiles, matrix.shape[0], matrix.scale, layout)
        return matrix

    @staticmethod
    def tiles_shape(shape: tuple[int, int], layout: str) -> tuple[int, int, int]:
        if layout not in ("tiles", "tiles5"):
            raise ValueError(f"layout must be 'tiles' or 'tiles5', got {layout!r}")
        return (layouts.tiles5_shape if layout == "tiles5" else layouts.tiles_shape)(shape)

    @classmethod
    def nbytes_of(cls, shape: tuple[int, int], layout: str) -> int:
        return int(np.prod(cls.tiles_shape(shape, layout)))

    @classmethod
    def from_layout(cls, layout: str, data: np.ndarray, shape) -> TernaryMatrix:
        """From the bytes of a file tensor in one of `layouts.FILE_LAYOUTS` (I2_S, TQ2_0, TQ1_0)."""
        if layout not in layouts.FILE_LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; known: {', '.join(layouts.FILE_LAYOUTS)}")
        return cls.stack([Part(layout, data, tuple(shape))])

    @classmethod
    def from_hf(cls, packed: np.ndarray, scale) -> TernaryMatrix:
        """From a Hugging Face packed uint8 [M/4, K] tensor and its multiplicative scale."""
        packed = np.asarray(packed)
        if packed.dtype != np.uint8 or packed.ndim != 2:
            raise ValueError(f"HF packed weights must be uint8 [M/4, K], got {packed.dtype} {packed.shape}")
        return cls.stack([Part("HF", packed.reshape(-1), (4 * packed.shape[0], packed.shape[1]), scale)])

    def _pack(self, parts: list[Part], layout: str, out: np.ndarray | None = None,
              n_threads: int | None = None) -> None:
        if not parts or len({p.shape[1] for p in parts}) != 1:
            raise ValueError(f"stacked matrices need one row length K, got {[p.shape for p in parts]}")
        self.shape, self.layout = (sum(p.shape[0] for p in parts), parts[0].shape[1]), layout
        tiles_shape = self.tiles_shape(self.shape, layout)
        self.tiles = (_native.empty_streaming(int(np.prod(tiles_shape))) if out is None else out).reshape(tiles_shape)
        scale, flags = _native.pack_tiles(self.tiles, [(p.layout, p.data, p.shape[0]) for p in parts],
                                          self.shape[1], layout, n_threads or default_threads())
        begin = 0
        for p, (corrupt, mixed_scales, nonzero) in zip(parts, flags):
            if corrupt:
                raise ValueError(f"{p.name or 'weights'}: {p.layout} weights that are not -1, 0 or +1")
            if mixed_scales:
                raise ValueError(f"{p.name or 'weights'}: {p.layout} block scales differ within a row; "
                                 "a ternary model has one scale per row")
            if p.name and not nonzero:
                warnings.warn(f"{p.name}: every weight is zero; the file may be corrupt", stacklevel=4)
            if p.layout in ("int8", "HF"):  # scales the bytes do not hold
                scale[begin : begin + p.shape[0]] = layouts.row_scales(p.scale, p.shape[0])
            begin += p.shape[0]
        layouts.row_scales(scale, self.shape[0])  # finite and non-negative, or ValueError
        self.scale = scale
        self._weights = _native.Weights(self.tiles, self.shape[0], self.scale, layout)

    @property
    def nbytes(self) -> int:
        return self.tiles.nbytes

    def __matmul__(self, x: np.ndarray) -> np.ndarray:
        """`matrix @ x` = x Wᵀ for float32 activations x [tokens, K]: quantize, then `matmul`."""
        return self.matmul(quantize_activations(x))

    def matmul(self, acts: Activations, *, isa: str | None = None,
               n_threads: int | None = None) -> np.ndarray:
        """float32 [tokens, M] = ((float)S - (float)row_sum) / act_scale * scale, S = sum code * q."""
        return _native.gemm(self._weights, acts, isa or default_isa(), n_threads or default_threads())

    def code_sums(self, acts: Activations, *, isa: str | None = None,
                  n_threads: int | None = None) -> np.ndarray:
        """The exact int32 sums S[n, m] = sum_k code[m, k] * q[n, k] behind `matmul`."""
        return _native.gemm_sums(self._weights, acts, isa or default_isa(),
                                 n_threads or default_threads())
