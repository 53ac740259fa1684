"""NumPy reference forward of every supported architecture: slow, short, obviously right.

The oracle for the C++ float ops (rms_norm, rope, attention, gated activations) and for the
engine as a whole, where transformers has no class for the architecture. Linear layers use the
exact ternary x int8 arithmetic of `tritlm.quant`.

Weights: a dict of float32 arrays (norms), float matrices (`token_embd`, `output`: arrays or
anything with `.to_array()`, such as `loader.FloatMatrix`) and ternary matrices (anything
with `.ternary` int8 [out, in] and `.scale` float32 [out], such as `loader.TernaryTensor`), named
as in GGUF: `blk.{i}.attn_norm`, `blk.{i}.attn_q` ... (see `LAYER_TENSORS`).
"""

from __future__ import annotations

import numpy as np

from ..quant import quantize_activations, ternary_matmul
from .config import ModelConfig

LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_sub_norm",
                 "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "ffn_sub_norm")


def linear(x: np.ndarray, weight) -> np.ndarray:
    """x [tokens, in] through a ternary matrix: int8 activations per token, exact sums."""
    q, act_scale, row_sum = quantize_activations(np.ascontiguousarray(x, dtype=np.float32))
    return ternary_matmul(weight.ternary, weight.scale, q, act_scale, row_sum)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight, the mean in double (as llama.cpp)."""
    mean_square = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    return (x * (1.0 / np.sqrt(mean_square + eps)).astype(np.float32) * weight).astype(np.float32)


def rope(x: np.ndarray, positions: np.ndarray, theta: float, style: str) -> np.ndarray:
    """Rotary embedding of x [tokens, heads, head_dim] at the tokens' positions."""
    d = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]
    cos = np.cos(angles)[:, None, :].astype(np.float32)
    sin = np.sin(angles)[:, None, :].astype(np.float32)
    if style == "neox":
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray,
              q_f16: bool = False) -> np.ndarray:
    """Causal grouped-query attention.

    q [tokens, n_heads, d] at `positions`; k, v [n_keys, n_kv_heads, d] at positions 0..n_keys-1.
    A query at position p sees keys 0..p. Returns [tokens, n_heads * d]. q_f16: q . k takes q
    rounded to f16, as ggml computes it against an F16 cache (it multiplies an F16 matrix by F32
    activations through their F16 copy).
    """
    if q_f16:
        q = q.astype(np.float16).astype(np.float32)
    tokens, n_heads, d = q.shape
    group = n_heads // k.shape[1]
    k = np.repeat(k, group, axis=1)  # query head h reads KV head h // group
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(d)
    visible = np.arange(k.shape[0])[None, :] <= positions[:, None]
    scores = np.where(visible[None], scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", probs, v).reshape(tokens, n_heads * d).astype(np.float32)


def gated(gate: np.ndarray, up: np.ndarray, activation: str) -> np.ndarray:
    if activation == "relu2":
        return (np.square(np.maximum(gate, 0)) * up).astype(np.float32)
    return (gate / (1 + np.exp(-gate)) * up).astype(np.float32)  # silu


def forward(config: ModelConfig, weights: dict, tokens: np.ndarray, kv_type: str = "f32") -> np.ndarray:
    """Logits [tokens, vocab] of a whole sequence starting at position 0.

    kv_type "f16" computes attention as an f16 KV cache makes llama.cpp (and the engine) do:
    k and v rounded to f16 where they are stored, and q rounded to f16 for q . k.
    """
    if kv_type not in ("f32", "f16"):
        raise ValueError(f"kv_type must be 'f32' or 'f16', got {kv_type!r}")
    f16 = kv_type == "f16"
    cached = (lambda a: a.astype(np.float16).astype(np.float32)) if f16 else (lambda a: a)
    positions = np.arange(len(tokens))
    embedding = _float(weights["token_embd"])
    x = embedding[tokens].astype(np.float32)
    d, eps = config.head_dim, config.norm_eps
    for i in range(config.n_layers):
        w = {name: weights.get(f"blk.{i}.{name}") for name in LAYER_TENSORS}
        h = rms_norm(x, w["attn_norm"], eps)
        q = linear(h, w["attn_q"]).reshape(len(tokens), config.n_heads, d)
        k = linear(h, w["attn_k"]).reshape(len(tokens), config.n_kv_heads, d)
        v = linear(h, w["attn_v"]).reshape(len(tokens), config.n_kv_heads, d)
        q = rope(q, positions, config.rope_theta, config.rope_style)
        k = rope(k, positions, config.rope_theta, config.rope_style)
        a = attention(q, cached(k), cached(v), positions, q_f16=f16)
        if config.sub_norms:
            a = rms_norm(a, w["attn_sub_norm"], eps)
        x = x + linear(a, w["attn_output"])
        h = rms_norm(x, w["ffn_norm"], eps)
        f = gated(linear(h, w["ffn_gate"]), linear(h, w["ffn_up"]), config.activation)
        if config.sub_norms:
            f = rms_norm(f, w["ffn_sub_norm"], eps)
        x = x + linear(f, w["ffn_down"])
    head = embedding if config.tied_embeddings else _float(weights["output"])
    return rms_norm(x, weights["output_norm"], eps) @ head.T


def _float(matrix) -> np.ndarray:
    return matrix.to_array() if hasattr(matrix, "to_array") else matrix
