"""The per-token float ops of the engine, in C++: RMSNorm, RoPE, the KV cache, attention, gated
activations, the LM head and the token-embedding lookup.

Each op matches `tritlm.models.reference` (and `gguf.quants` for the weight types) to float32
rounding. Activations are float32 and C-contiguous; nothing is converted behind the caller's back,
and a bad argument raises ValueError naming it. Like `tritlm.kernels`, every op takes `isa` (a
kernel set from `kernels.ISAS`; default the best, or `TRITLM_ISA`) and the heavy ones `n_threads`
(default: every CPU this process may use).

The KV cache is a pair of NumPy arrays [n_ctx, n_kv_heads, head_dim] of float16 (or float32),
owned by the caller: `store_kv` writes rows into it, `attention` reads it.
"""

from __future__ import annotations

import numpy as np

from . import _native
from .kernels import default_isa, default_threads

WEIGHT_TYPES: dict[str, tuple[int, int]] = {  # type: (elements, bytes) per block
    "F32": (1, 4), "F16": (1, 2), "Q8_0": (32, 34), "Q6_K": (256, 210)}
ACTIVATIONS = ("relu2", "silu", "gelu_tanh")


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, *, isa: str | None = None,
             n_threads: int | None = None) -> np.ndarray:
    """x [T, D] * (float)(1 / sqrt(mean(x²) + eps)) * weight [D], the mean in double.

    Returns a new float32 [T, D] (a 1-D x gives a 1-D result). A row holding NaN comes out all
    NaN, and one holding ±inf comes out 0 with NaN at the infinities, exactly as the NumPy
    reference computes it; no error is raised (`kernels.quantize_activations` rejects them next).
    """
    x = np.asarray(x)
    out = _native.rms_norm(x[None] if x.ndim == 1 else x, np.asarray(weight), float(eps),
                           isa or default_isa(), n_threads or default_threads())
    return out[0] if x.ndim == 1 else out


def rope(x: np.ndarray, positions, theta: float, neox: bool = True, *,
         n_threads: int | None = None) -> np.ndarray:
    """Rotary embedding of x [T, heads, head_dim] (float32, writable), IN PLACE; returns x.

    Token t rotates by angles positions[t] * theta^(-2i/head_dim), computed in double. neox
    pairs element i with i + head_dim/2 (HF's rotate_half, BitNet); otherwise 2i with 2i + 1
    (GGUF llama's q/k order).
    """
    _native.rope(x, _int32(positions, "positions"), float(theta), bool(neox),
                 n_threads or default_threads())
    return x


def store_kv(cache_k: np.ndarray, cache_v: np.ndarray, k: np.ndarray, v: np.ndarray,
             start_position: int, *, isa: str | None = None) -> None:
    """Write k, v [T, n_kv_heads, head_dim] (float32) into cache rows start_position ..
    start_position + T - 1; a float16 cache gets them rounded to nearest even."""
    _native.store_kv(cache_k, cache_v, np.asarray(k), np.asarray(v), int(start_position),
                     isa or default_isa())


def attention(q: np.ndarray, cache_k: np.ndarray, cache_v: np.ndarray, positions, *,
              scale: float = 0.0, window: int = 0, isa: str | None = None,
              n_threads: int | None = None) -> np.ndarray:
    """Causal grouped-query attention; returns float32 [T, n_heads * head_dim].

    q [T, n_heads, head_dim] holds the (rotated) queries of tokens at `positions`; query head h
    reads KV head h // (n_heads / n_kv_heads). The query at position p attends cache rows 0..p
    (with a window, only the last `window` of them) with scale `scale` (0: 1/sqrt(head_dim)):
    those rows must already be stored (`store_kv`), the token's own included. Softmax is in
    float32, shifted by the row maximum.
    """
    return _native.attention(np.asarray(q), np.asarray(cache_k), np.asarray(cache_v),
                             _int32(positions, "positions"), isa or default_isa(),
                             n_threads or default_threads(), scale, window)


def gated(gate: np.ndarray, up: np.ndarray, activation: str, *, isa: str | None = None,
          n_threads: int | None = None) -> np.ndarray:
    """The gated FFN activation in float32 (relu² overflows fp16): relu(gate)² * up for
    "relu2" (BitNet b1.58), gate / (1 + exp(-gate)) * up for "silu", GELU's tanh approximation
    times up for "gelu_tanh" (Gemma). [T, F] or [F]."""
    gate, up = np.asarray(gate), np.asarray(up)
    one = gate.ndim == 1 and up.ndim == 1
    out = _native.gated(gate[None] if one else gate, up[None] if one else up, activation,
                        isa or default_isa(), n_threads or default_threads())
    return out[0] if one else out


def head_matmul(x: np.ndarray, weight: np.ndarray, vocab: int, type: str, *,
                isa: str | None = None, n_threads: int | None = None) -> np.ndarray:
    """logits [T, vocab] = x [T, D] @ Wᵀ, in float32.

    `weight` holds the [vocab, D] matrix W as its GGUF tensor data: raw bytes (uint8), or for
    F16 / F32 also a float16 / float32 array. `type` is one of `WEIGHT_TYPES`; quantized weights
    are dequantized exactly as gguf.quants does it, and x stays float.
    """
    return _native.head_matmul(np.asarray(x), _weight_bytes(weight, type), int(vocab), type,
                               isa or default_isa(), n_threads or default_threads())


def embedding_rows(weight: np.ndarray, vocab: int, dim: int, type: str, token_ids, *,
                   isa: str | None = None) -> np.ndarray:
    """The token embedding lookup: rows token_ids [T] of the [vocab, dim] matrix (as in
    `head_matmul`), dequantized to float32 [T, dim]."""
    return _native.embedding_rows(_weight_bytes(weight, type), int(vocab), int(dim), type,
                                  _int32(token_ids, "token_ids"), isa or default_isa())


def weight_nbytes(type: str, vocab: int, dim: int) -> int:
    """Bytes of a [vocab, dim] matrix of `type` (dim a multiple of the type's block)."""
    if type not in WEIGHT_TYPES:
        raise ValueError(f"unknown weight type {type!r}; known: {', '.join(WEIGHT_TYPES)}")
    elements, nbytes = WEIGHT_TYPES[type]
    if dim % elements:
        raise ValueError(f"dim={dim} is not a multiple of {elements} ({type} blocks)")
    return vocab * dim // elements * nbytes


def _weight_bytes(weight, type: str) -> np.ndarray:
    w = np.asarray(weight)
    allowed = {"F16": np.float16, "F32": np.float32}.get(type)
    if w.dtype not in (np.uint8, np.int8) and w.dtype != allowed:
        raise ValueError(f"weight: expected the tensor's bytes (uint8) for type {type}, got {w.dtype}")
    if not w.flags.c_contiguous:
        raise ValueError("weight: must be C-contiguous")
    return w.reshape(-1).view(np.uint8)


def _int32(values, name: str) -> np.ndarray:
    """Positions or token ids as int32: any integer array or sequence whose values fit."""
    a = np.asarray(values)
    if a.dtype == np.int32:
        return a
    if a.dtype.kind not in "iu" and a.size:
        raise ValueError(f"{name}: expected integers, got {a.dtype}")
    if a.size and (a.min() < -2**31 or a.max() >= 2**31):
        raise ValueError(f"{name}: values do not fit in int32")
    return a.astype(np.int32)
