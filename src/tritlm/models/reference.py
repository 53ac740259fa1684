"""NumPy reference forward of every supported architecture: slow, short, obviously right.

The oracle for the C++ float ops (rms_norm, rope, attention, gated activations) and for the
engine as a whole, where transformers has no class for the architecture. Linear layers use the
exact ternary x int8 arithmetic of `tritlm.quant`.

Weights: a dict of float32 arrays (norms, as they multiply: Gemma's 1 + w already added by the
loader), float matrices (`token_embd`, `output`: arrays or anything with `.to_array()`, such as
`loader.FloatMatrix`) and ternary matrices (anything with `.ternary` int8 [out, in] and `.scale`
float32 [out], such as `loader.TernaryTensor`), named as in GGUF: `blk.{i}.attn_norm`,
`blk.{i}.attn_q` ... (the architecture description's tensors; `arch.py` states the block).
"""

from __future__ import annotations

import numpy as np

from ..quant import quantize_activations, ternary_matmul
from .config import ModelConfig


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
              q_f16: bool = False, scale: float | None = None, window: int = 0) -> np.ndarray:
    """Causal grouped-query attention.

    q [tokens, n_heads, d] at `positions`; k, v [n_keys, n_kv_heads, d] at positions 0..n_keys-1.
    A query at position p sees keys 0..p, or with a window only p - window + 1..p. Returns
    [tokens, n_heads * d]. scale: of q . k, 1 / sqrt(d) by default. q_f16: q . k takes q rounded
    to f16, as ggml computes it against an F16 cache (it multiplies an F16 matrix by F32
    activations through their F16 copy).
    """
    if q_f16:
        q = q.astype(np.float16).astype(np.float32)
    tokens, n_heads, d = q.shape
    group = n_heads // k.shape[1]
    k = np.repeat(k, group, axis=1)  # query head h reads KV head h // group
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) * np.float64(1 / np.sqrt(d) if scale is None else scale)
    keys = np.arange(k.shape[0])[None, :]
    visible = (keys <= positions[:, None]) & ((keys > positions[:, None] - window) if window else True)
    scores = np.where(visible[None], scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", probs, v).reshape(tokens, n_heads * d).astype(np.float32)


def gated(gate: np.ndarray, up: np.ndarray, activation: str) -> np.ndarray:
    if activation == "relu2":
        return (np.square(np.maximum(gate, 0)) * up).astype(np.float32)
    if activation == "gelu_tanh":  # 0.5 g (1 + tanh u) = g / (1 + e^-2u), which does not cancel for g << 0
        g = gate.astype(np.float64)
        return (g / (1 + np.exp(-2 * np.sqrt(2 / np.pi) * (g + 0.044715 * g**3))) * up).astype(np.float32)
    return (gate / (1 + np.exp(-gate)) * up).astype(np.float32)  # silu


def forward(config: ModelConfig, weights: dict, tokens: np.ndarray, kv_type: str = "f32",
            hidden: bool = False) -> np.ndarray:
    """Logits [tokens, vocab] of a whole sequence starting at position 0 (hidden: the final
    normed hidden states [tokens, hidden_size] instead).

    kv_type "f16" computes attention as an f16 KV cache makes llama.cpp (and the engine) do:
    k and v rounded to f16 where they are stored, and q rounded to f16 for q . k.
    """
    if kv_type not in ("f32", "f16"):
        raise ValueError(f"kv_type must be 'f32' or 'f16', got {kv_type!r}")
    f16 = kv_type == "f16"
    cached = (lambda a: a.astype(np.float16).astype(np.float32)) if f16 else (lambda a: a)
    arch, eps, n = config.architecture, config.norm_eps, len(tokens)
    positions = np.arange(n)
    embedding = _float(weights["token_embd"])
    x = embedding[tokens].astype(np.float32)
    if arch.embedding_scale:
        x = x * np.float32(np.sqrt(config.hidden_size))
    for i in range(config.n_layers):
        w = {name: weights[f"blk.{i}.{name}"] for name in arch.tensors}
        norm = lambda a, name: rms_norm(a, w[name], eps) if name in w else a  # noqa: E731
        proj = lambda a, name: linear(norm(a, arch.input_norms.get(name, "")), w[name])  # noqa: E731
        heads = lambda a, h: a.reshape(n, h, config.head_dim)  # noqa: E731

        h = norm(x, "attn_norm")
        q = norm(heads(proj(h, "attn_q"), config.n_heads), "attn_q_norm")
        k = norm(heads(proj(h, "attn_k"), config.n_kv_heads), "attn_k_norm")
        v = heads(proj(h, "attn_v"), config.n_kv_heads)
        q = rope(q, positions, config.theta(i), config.rope_style)
        k = rope(k, positions, config.theta(i), config.rope_style)
        a = attention(q, cached(k), cached(v), positions, q_f16=f16, scale=config.attention_scale,
                      window=config.window(i))
        x = x + norm(proj(a, "attn_output"), "post_attention_norm")
        h = norm(x, "ffn_norm")
        f = gated(proj(h, "ffn_gate"), proj(h, "ffn_up"), arch.activation)
        x = x + norm(proj(f, "ffn_down"), "post_ffw_norm")
    x = rms_norm(x, weights["output_norm"], eps)
    if hidden:
        return x
    head = embedding if config.tied_embeddings else _float(weights["output"])
    return x @ head.T


def _float(matrix) -> np.ndarray:
    return matrix.to_array() if hasattr(matrix, "to_array") else matrix
