"""The engine: weights ready for the kernels, and a batch of sequences run through them.

Each `Sequence` owns its KV cache and position. `Engine.forward` advances any number of
sequences at once: their new tokens are stacked, so each weight matrix is streamed once per step
for all of them (that is what makes serving many users cheap), while RoPE, the KV cache and
attention are per sequence. Long prompts are split into chunks of `prefill_chunk` tokens.

A step runs in C++ (`_native.Model`: the kernels and ops of every layer, in the order the model
card gives, without returning to Python). Every op treats each token on its own (no reduction
runs across tokens), so the logits of a token do not depend on how it was batched:
token-by-token decoding reproduces a full forward bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import _native, kernels
from ..kernels import Part, TernaryMatrix
from ..models.config import ModelConfig
from ..models.loader import FloatMatrix, StoredTernary

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


# Each layer's ternary matrices, stacked from these tensors: one stream over the weights for
# q, k and v, and one for gate and up.
STACKS = {"qkv": ("attn_q", "attn_k", "attn_v"), "attn_output": ("attn_output",),
          "gate_up": ("ffn_gate", "ffn_up"), "ffn_down": ("ffn_down",)}


def _part(name: str, tensor) -> Part:
    if isinstance(tensor, StoredTernary):  # packed straight from the file's bytes
        return Part(tensor.layout, tensor.region.read(), tensor.shape, tensor.row_scale, name)
    return Part("int8", tensor.ternary, tensor.shape, tensor.scale, name)


def _stacked_shape(stack: dict) -> tuple[int, int]:
    return sum(t.shape[0] for t in stack.values()), next(iter(stack.values())).shape[1]


class _Arena:
    """One huge-page buffer, handed out in consecutive 64-byte-aligned pieces."""

    def __init__(self, sizes: list[int]):
        self.buffer, self.offset = _native.empty_streaming(sum(map(self._aligned, sizes))), 0

    @staticmethod
    def _aligned(nbytes: int) -> int:
        return -(-nbytes // 64) * 64

    def take(self, nbytes: int) -> np.ndarray:
        start = self.offset
        self.offset += self._aligned(nbytes)
        return self.buffer[start : start + nbytes]

    def copy_of(self, matrix: FloatMatrix) -> FloatMatrix:
        matrix.read_into(data := self.take(matrix.nbytes))
        return FloatMatrix(data, matrix.type, matrix.rows, matrix.cols)


class Sequence:
    """One stream of tokens: its KV cache, [layers, 2 (k, v), n_ctx, kv heads, head dim], and
    how many positions it holds."""

    def __init__(self, config: ModelConfig, n_ctx: int, kv_dtype):
        self.kv = np.zeros((config.n_layers, 2, n_ctx, config.n_kv_heads, config.head_dim), kv_dtype)
        self.n_ctx = n_ctx
        self.position = 0  # tokens held in the cache

    def truncate(self, n: int) -> None:
        """Forget everything after the first n tokens (to reuse a shared prompt prefix, or to
        drop rejected speculative guesses): only the position moves back; the cache rows beyond
        it are overwritten by the next tokens fed."""
        if not 0 <= n <= self.position:
            raise ValueError(f"cannot truncate a sequence of {self.position} tokens to {n}")
        self.position = n


class Engine:
    """weight_layout: "tiles" (2 bits per weight) or "tiles5" (1.625); default the one the kernels
    stream fastest on this CPU (`kernels.best_layout`), whatever layout the file holds."""

    def __init__(self, config: ModelConfig, tensors: dict, *, n_ctx: int | None = None,
                 n_threads: int | None = None, kv_type: str = "f16", prefill_chunk: int = 256,
                 weight_layout: str | None = None):
        if kv_type not in KV_DTYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_DTYPES)}, got {kv_type!r}")
        self.config = config
        self.n_ctx = n_ctx or config.context_length
        if not 0 < self.n_ctx <= config.context_length:
            raise ValueError(f"n_ctx must be between 1 and the model's context {config.context_length}")
        self.kv_dtype = KV_DTYPES[kv_type]
        self.prefill_chunk = prefill_chunk
        self.isa = kernels.default_isa()
        self.set_threads(n_threads or kernels.idle_cores())
        # Every weight a step streams lives in one huge-page buffer, filled tensor by tensor from
        # the file: a buffer per matrix would round each up to whole 2 MiB pages.
        head = tensors["token_embd" if config.tied_embeddings else "output"]
        floats = [head] if config.tied_embeddings else [head, tensors["token_embd"]]
        stacks = [{key: {f"blk.{i}.{n}": tensors[f"blk.{i}.{n}"] for n in names} for key, names in STACKS.items()}
                  for i in range(config.n_layers)]
        layout = {key: weight_layout or kernels.best_layout(self.isa, _stacked_shape(stack)[1])
                  for key, stack in stacks[0].items()}  # every layer alike
        nbytes = {key: TernaryMatrix.nbytes_of(_stacked_shape(stack), layout[key]) for key, stack in stacks[0].items()}
        arena = _Arena([f.nbytes for f in floats] + [nbytes[key] for layer in stacks for key in layer])
        self.weights = arena.buffer  # uint8: every weight a step streams
        self.head = arena.copy_of(head)
        self.embedding = self.head if config.tied_embeddings else arena.copy_of(tensors["token_embd"])
        self.layers = []
        for i, layer in enumerate(stacks):
            matrices = {key: TernaryMatrix.stack([_part(n, t) for n, t in stack.items()], layout[key],
                                                 out=arena.take(nbytes[key]), n_threads=self.n_threads)
                        for key, stack in layer.items()}
            norms = {n: tensors.get(f"blk.{i}.{n}") for n in ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm")}
            self.layers.append(Layer(**norms, **matrices))
        c = config
        dims = {"hidden": c.hidden_size, "ffn": c.intermediate_size, "heads": c.n_heads,
                "kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab": c.vocab_size,
                "eps": c.norm_eps, "theta": c.rope_theta, "neox": c.rope_style == "neox",
                "relu2": c.activation == "relu2"}
        self._model = _native.Model(dims, [vars(layer) for layer in self.layers], self.embedding.data,
                                    self.embedding.type, self.head.data, self.head.type,
                                    np.ascontiguousarray(tensors["output_norm"], dtype=np.float32))

    def set_threads(self, n_threads: int) -> None:
        if n_threads < 1:
            raise ValueError(f"n_threads must be at least 1, got {n_threads}")
        self.n_threads = n_threads

    @property
    def decode_bytes(self) -> int:
        """Weight bytes one decode step reads: every ternary matrix and the output head."""
        matrices = [m for layer in self.layers
                    for m in (layer.qkv, layer.attn_output, layer.gate_up, layer.ffn_down)]
        return sum(m.nbytes for m in matrices) + self.head.nbytes

    def op_seconds(self) -> dict[str, float]:
        """Seconds the steps so far spent in each kind of op: "ternary" (the ternary matrices and
        their activation quantization), "head", "attention" (with RoPE and the KV writes) and
        "other" (norms, embedding, activation, residuals)."""
        return self._model.op_seconds()

    def new_sequence(self, n_ctx: int | None = None) -> Sequence:
        n_ctx = n_ctx or self.n_ctx
        if not 0 < n_ctx <= self.config.context_length:
            raise ValueError(f"n_ctx must be between 1 and the model's context {self.config.context_length}")
        return Sequence(self.config, n_ctx, self.kv_dtype)

    def forward(self, batch: list[tuple[Sequence, list[int]]],
                all_logits: bool | list[bool] = False) -> list[np.ndarray]:
        """Append each sequence's tokens and return its logits: [1, vocab] for its last token, or
        [tokens, vocab] for every one with all_logits (one flag for the batch, or one per sequence).

        Speculative decoding verifies guesses this way: a sequence's last token and k guesses in
        one step (beside other sequences' tokens), the logits after each; then `truncate` drops
        the guesses after the first one rejected."""
        for seq, tokens in batch:
            self._check(seq, tokens)
        every = [all_logits] * len(batch) if isinstance(all_logits, bool) else list(all_logits)
        if len(every) != len(batch):
            raise ValueError(f"all_logits has {len(every)} flags for {len(batch)} sequences")
        outputs = [[] for _ in batch]
        pending = [(i, seq, list(tokens)) for i, (seq, tokens) in enumerate(batch)]
        while pending:  # chunked prefill: at most prefill_chunk tokens per sequence per step
            step = [(i, seq, tokens[: self.prefill_chunk]) for i, seq, tokens in pending]
            done = [len(tokens) <= self.prefill_chunk for _, _, tokens in pending]
            keep = ["all" if every[i] else "last" if last else "none" for (i, _, _), last in zip(pending, done)]
            for (i, _, _), logits in zip(step, self._step([(s, t) for _, s, t in step], keep)):
                outputs[i].append(logits)
            pending = [(i, seq, tokens[self.prefill_chunk :]) for (i, seq, tokens), last
                       in zip(pending, done) if not last]
        return [np.concatenate(parts) for parts in outputs]

    def hidden_states(self, sequence: Sequence, tokens: list[int]) -> np.ndarray:
        """Append `tokens` to `sequence` and return their final hidden states, float32
        [len(tokens), hidden]: the output norm's result, what the LM head reads (for embeddings)."""
        self._check(sequence, tokens)
        return np.concatenate([self._step([(sequence, tokens[i : i + self.prefill_chunk])], ["all"], hidden=True)[0]
                               for i in range(0, len(tokens), self.prefill_chunk)])

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

    def _step(self, parts: list[tuple[Sequence, list[int]]], keep: list[str], hidden: bool = False) -> list[np.ndarray]:
        """One pass of the stacked tokens of every part through the model; for each part the
        rows its `keep` asks for ("all", "last" or "none")."""
        ids = np.concatenate([np.asarray(t, np.int32) for _, t in parts])
        positions = np.concatenate([np.arange(s.position, s.position + len(t), dtype=np.int32)
                                    for s, t in parts])
        bounds = np.cumsum([0] + [len(t) for _, t in parts])
        rows = [np.arange(b, e) if k == "all" else np.arange(e - 1, e) if k == "last" else np.arange(0)
                for b, e, k in zip(bounds[:-1], bounds[1:], keep)]
        out = self._model.forward(ids, positions, bounds.tolist(), [s.kv for s, _ in parts],
                                  np.concatenate(rows).astype(np.int64), self.isa, self.n_threads, hidden)
        for seq, tokens in parts:
            seq.position += len(tokens)
        return np.split(out, np.cumsum([len(r) for r in rows])[:-1])
