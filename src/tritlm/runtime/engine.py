"""The engine: weights ready for the kernels, and a batch of sequences run through them.

Each `Sequence` owns its KV cache and position. `Engine.forward` advances any number of
sequences at once: their new tokens are stacked, so each weight matrix is streamed once per step
for all of them (that is what makes serving many users cheap), while RoPE, the KV cache and
attention are per sequence. Long prompts are split into chunks of `prefill_chunk` tokens.

Every op treats each token on its own (no reduction runs across tokens), so the logits of a
token do not depend on how it was batched: token-by-token decoding reproduces a full forward
bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import kernels, ops
from ..kernels import TernaryMatrix
from ..models.config import ModelConfig

KV_DTYPES = {"f16": np.float16, "f32": np.float32}


@dataclass
class Layer:
    attn_norm: np.ndarray
    qkv: TernaryMatrix  # q, k and v stacked: one stream over the weights
    attn_sub_norm: np.ndarray | None
    attn_output: TernaryMatrix
    ffn_norm: np.ndarray
    gate_up: TernaryMatrix  # gate and up stacked
    ffn_sub_norm: np.ndarray | None
    ffn_down: TernaryMatrix


def _stacked(*tensors) -> TernaryMatrix:
    return TernaryMatrix(np.concatenate([t.ternary for t in tensors]),
                         np.concatenate([t.scale for t in tensors]))


class Sequence:
    """One stream of tokens: its KV cache ([n_ctx, kv heads, head dim] per layer) and length."""

    def __init__(self, config: ModelConfig, n_ctx: int, kv_dtype):
        shape = (n_ctx, config.n_kv_heads, config.head_dim)
        self.k = [np.zeros(shape, kv_dtype) for _ in range(config.n_layers)]
        self.v = [np.zeros(shape, kv_dtype) for _ in range(config.n_layers)]
        self.n_ctx = n_ctx
        self.position = 0  # tokens held in the cache

    def truncate(self, n: int) -> None:
        """Forget everything after the first n tokens (e.g. to reuse a shared prompt prefix)."""
        if not 0 <= n <= self.position:
            raise ValueError(f"cannot truncate a sequence of {self.position} tokens to {n}")
        self.position = n


class Engine:
    def __init__(self, config: ModelConfig, tensors: dict, *, n_ctx: int | None = None,
                 n_threads: int | None = None, kv_type: str = "f16", prefill_chunk: int = 256):
        if kv_type not in KV_DTYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_DTYPES)}, got {kv_type!r}")
        self.config = config
        self.n_ctx = n_ctx or config.context_length
        if not 0 < self.n_ctx <= config.context_length:
            raise ValueError(f"n_ctx must be between 1 and the model's context {config.context_length}")
        self.n_threads = n_threads or kernels.default_threads()
        self.kv_dtype = KV_DTYPES[kv_type]
        self.prefill_chunk = prefill_chunk
        self.isa = kernels.default_isa()
        self.embedding = tensors["token_embd"]
        self.head = self.embedding if config.tied_embeddings else tensors["output"]
        self.output_norm = tensors["output_norm"]
        self.layers = []
        for i in range(config.n_layers):
            t = {name.split(".", 2)[2]: value for name, value in tensors.items()
                 if name.startswith(f"blk.{i}.")}
            self.layers.append(Layer(
                attn_norm=t["attn_norm"], qkv=_stacked(t["attn_q"], t["attn_k"], t["attn_v"]),
                attn_sub_norm=t.get("attn_sub_norm"), attn_output=_stacked(t["attn_output"]),
                ffn_norm=t["ffn_norm"], gate_up=_stacked(t["ffn_gate"], t["ffn_up"]),
                ffn_sub_norm=t.get("ffn_sub_norm"), ffn_down=_stacked(t["ffn_down"])))

    def new_sequence(self, n_ctx: int | None = None) -> Sequence:
        n_ctx = n_ctx or self.n_ctx
        if not 0 < n_ctx <= self.config.context_length:
            raise ValueError(f"n_ctx must be between 1 and the model's context {self.config.context_length}")
        return Sequence(self.config, n_ctx, self.kv_dtype)

    def forward(self, batch: list[tuple[Sequence, list[int]]], all_logits: bool = False) -> list[np.ndarray]:
        """Append each sequence's tokens and return its logits: [1, vocab] for its last token, or
        [tokens, vocab] for every one with all_logits."""
        for seq, tokens in batch:
            self._check(seq, tokens)
        outputs = [[] for _ in batch]
        pending = [(i, seq, list(tokens)) for i, (seq, tokens) in enumerate(batch)]
        while pending:  # chunked prefill: at most prefill_chunk tokens per sequence per step
            step = [(i, seq, tokens[: self.prefill_chunk]) for i, seq, tokens in pending]
            done = [len(tokens) <= self.prefill_chunk for _, _, tokens in pending]
            keep = ["all" if all_logits else "last" if last else "none" for last in done]
            for (i, _, _), logits in zip(step, self._step([(s, t) for _, s, t in step], keep)):
                outputs[i].append(logits)
            pending = [(i, seq, tokens[self.prefill_chunk :]) for (i, seq, tokens), last
                       in zip(pending, done) if not last]
        return [np.concatenate(parts) for parts in outputs]

    def _check(self, seq: Sequence, tokens) -> None:
        if not len(tokens):
            raise ValueError("no tokens to process")
        if seq.position + len(tokens) > seq.n_ctx:
            raise ValueError(f"{seq.position} + {len(tokens)} tokens exceed the context of "
                             f"{seq.n_ctx} tokens")
        ids = np.asarray(tokens)
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got "
                             f"{ids.min()}..{ids.max()}")

    def _quantize(self, x: np.ndarray):
        return kernels.quantize_activations(x, isa=self.isa, n_threads=self.n_threads)

    def _matmul(self, matrix: TernaryMatrix, x: np.ndarray) -> np.ndarray:
        return matrix.matmul(self._quantize(x), isa=self.isa, n_threads=self.n_threads)

    def _step(self, parts: list[tuple[Sequence, list[int]]], keep: list[str]) -> list[np.ndarray]:
        """One pass of the stacked tokens of every part through the model."""
        c, nt = self.config, self.n_threads
        d, q_dim, kv_dim = c.head_dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        ids = np.concatenate([np.asarray(t, np.int32) for _, t in parts])
        positions = np.concatenate([np.arange(s.position, s.position + len(t), dtype=np.int32)
                                    for s, t in parts])
        bounds = np.cumsum([0] + [len(t) for _, t in parts])
        x = ops.embedding_rows(self.embedding.data, self.embedding.type, self.embedding.rows,
                               self.embedding.cols, ids)
        for li, layer in enumerate(self.layers):
            h = ops.rms_norm(x, layer.attn_norm, c.norm_eps)
            qkv = self._matmul(layer.qkv, h)
            q = np.ascontiguousarray(qkv[:, :q_dim]).reshape(-1, c.n_heads, d)
            k = np.ascontiguousarray(qkv[:, q_dim : q_dim + kv_dim]).reshape(-1, c.n_kv_heads, d)
            v = np.ascontiguousarray(qkv[:, q_dim + kv_dim :]).reshape(-1, c.n_kv_heads, d)
            neox = c.rope_style == "neox"
            q = ops.rope(q, positions, c.rope_theta, neox)
            k = ops.rope(k, positions, c.rope_theta, neox)
            a = np.empty((len(ids), q_dim), np.float32)
            for (seq, _), begin, end in zip(parts, bounds[:-1], bounds[1:]):
                ops.store_kv(seq.k[li], seq.v[li], k[begin:end], v[begin:end], seq.position)
                a[begin:end] = ops.attention(q[begin:end], seq.k[li], seq.v[li],
                                             positions[begin:end], n_threads=nt)
            if layer.attn_sub_norm is not None:
                a = ops.rms_norm(a, layer.attn_sub_norm, c.norm_eps)
            x = x + self._matmul(layer.attn_output, a)
            h = ops.rms_norm(x, layer.ffn_norm, c.norm_eps)
            gate_up = self._matmul(layer.gate_up, h)
            f = ops.gated(np.ascontiguousarray(gate_up[:, : c.intermediate_size]),
                          np.ascontiguousarray(gate_up[:, c.intermediate_size :]), c.activation)
            if layer.ffn_sub_norm is not None:
                f = ops.rms_norm(f, layer.ffn_sub_norm, c.norm_eps)
            x = x + self._matmul(layer.ffn_down, f)
        for seq, tokens in parts:
            seq.position += len(tokens)
        # logits only for the rows asked for: each part's "all", "last" or "none"
        spans = list(zip(bounds[:-1], bounds[1:]))
        rows = [np.arange(b, e) if k == "all" else np.arange(e - 1, e) if k == "last" else np.arange(0)
                for (b, e), k in zip(spans, keep)]
        selected = np.concatenate(rows)
        if not len(selected):
            return [np.zeros((0, c.vocab_size), np.float32) for _ in parts]
        h = ops.rms_norm(np.ascontiguousarray(x[selected]), self.output_norm, c.norm_eps)
        logits = ops.head_matmul(h, self.head.data, self.head.type, self.head.rows, n_threads=nt)
        return np.split(logits, np.cumsum([len(r) for r in rows])[:-1])
