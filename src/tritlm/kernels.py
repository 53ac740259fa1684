"""The C++ kernels, behind a checked Python API.

Weights live in `TernaryMatrix`: one copy, 2 bits per weight, repacked once from any file layout
into the tile layout the kernels stream (see `tritlm.quant.layouts`) and held in huge-page-backed
memory. Activations are quantized per token by `quantize_activations`, once per input, and the
result can feed several matrices (q, k and v read the same activations).

Every call takes `isa` (a kernel set from `ISAS`, default the best, or the `TRITLM_ISA`
environment variable) and `n_threads` (default: every CPU this process may use).
"""

from __future__ import annotations

import os

import numpy as np

from . import _native
from .quant import layouts

ISAS: tuple[str, ...] = tuple(_native.isas())  # best first


def default_isa() -> str:
    isa = os.environ.get("TRITLM_ISA", ISAS[0])
    if isa not in ISAS:
        raise ValueError(f"TRITLM_ISA={isa!r} is not available on this CPU; available: {', '.join(ISAS)}")
    return isa


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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


class TernaryMatrix:
    """A ternary weight matrix [M, K] (weight = ternary * scale[row]) ready for the kernels."""

    def __init__(self, ternary: np.ndarray, scale):
        ternary = np.asarray(ternary)
        if ternary.ndim != 2 or ternary.shape[1] % 128 or not ternary.shape[0]:
            raise ValueError(f"ternary weights must be [M, K] with K a multiple of 128, got {ternary.shape}")
        self.shape = ternary.shape
        tiles = layouts.pack_tiles(ternary)
        self.tiles = _native.empty_streaming(tiles.nbytes).reshape(tiles.shape)
        self.tiles[...] = tiles
        self.scale = np.array(layouts.row_scales(scale, self.shape[0]))
        self._weights = _native.Weights(self.tiles, self.shape[0], self.scale)

    @classmethod
    def from_layout(cls, layout: str, data: np.ndarray, shape) -> TernaryMatrix:
        """From the bytes of a file tensor in one of `layouts.FILE_LAYOUTS` (I2_S, TQ2_0, TQ1_0)."""
        if layout not in layouts.FILE_LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; known: {', '.join(layouts.FILE_LAYOUTS)}")
        _, unpack = layouts.FILE_LAYOUTS[layout]
        return cls(*unpack(data, tuple(shape)))

    @classmethod
    def from_hf(cls, packed: np.ndarray, scale) -> TernaryMatrix:
        """From a Hugging Face packed uint8 [M/4, K] tensor and its multiplicative scale."""
        return cls(layouts.unpack_hf(packed), scale)

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
