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

import dataclasses
from dataclasses import dataclass

import numpy as np

from .. import _native, kernels
from . import memory, weight_cache
from ..kernels import Part, TernaryMatrix
from ..models.arch import Architecture
from ..models.config import ModelConfig
from ..formats.region import FileRegion
from ..models.loader import FloatMatrix, StoredTernary

KV_DTYPES = {"f16": np.float16, "f32": np.float32}


@dataclass
class Layer:
    """One block's weights as the step streams them (models/arch.py states the block). Each
    projection group is a list of (input norm or None, matrix): the matrices that read the same
    input are stacked into one (one stream over the weights, one quantization of the input)."""

    norms: dict[str, np.ndarray]  # attn_norm, ffn_norm, and whichever optional norms the block has
    qkv: list[tuple[np.ndarray | None, TernaryMatrix]]
    attn_output: list[tuple[np.ndarray | None, TernaryMatrix]]
    gate_up: list[tuple[np.ndarray | None, TernaryMatrix]]
    ffn_down: list[tuple[np.ndarray | None, TernaryMatrix]]

    @property
    def matrices(self) -> list[TernaryMatrix]:
        return [m for group in (self.qkv, self.attn_output, self.gate_up, self.ffn_down) for _, m in group]


GROUPS = {"qkv": ("attn_q", "attn_k", "attn_v"), "attn_output": ("attn_output",),
          "gate_up": ("ffn_gate", "ffn_up"), "ffn_down": ("ffn_down",)}
BLOCK_NORMS = ("attn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")


def stacks(arch: Architecture) -> dict[str, list[tuple[str, ...]]]:
    """Each group's projections as stacked matrices: all in one, unless each normalizes its input."""
    return {key: [names] if not any(n in arch.input_norms for n in names) else [(n,) for n in names]
            for key, names in GROUPS.items()}


def _part(name: str, tensor, drop_behind: bool) -> Part:
    if isinstance(tensor, StoredTernary):  # packed straight from the file's bytes, read once
        return Part(tensor.layout, tensor.region.read(drop_behind=drop_behind), tensor.shape, tensor.row_scale, name)
    return Part("int8", tensor.ternary, tensor.shape, tensor.scale, name)


def _file_bytes(tensor) -> int:
    """Bytes of the tensor the engine will read from its file."""
    if isinstance(tensor, StoredTernary):
        return tensor.region.nbytes
    return tensor.nbytes if isinstance(tensor, FloatMatrix) and isinstance(tensor.source, FileRegion) else 0


def weight_cache_source(tensors: dict) -> tuple[str, int]:
    """The GGUF file every streamed weight comes from, and where its tensor data begins (the end
    of its metadata and tensor table): what a weight cache is checked against. ValueError for a
    Hugging Face directory: its embedding is converted in memory, its scales' meaning lies in
    config.json, its weights in several files; converting it to GGUF once is the way."""
    regions = [t.region if isinstance(t, StoredTernary) else t.source for t in tensors.values()
               if isinstance(t, (StoredTernary, FloatMatrix))]
    paths = {r.path for r in regions if isinstance(r, FileRegion)}
    if len(paths) == 1 and all(isinstance(r, FileRegion) for r in regions):
        with open(path := paths.pop(), "rb") as f:
            if f.read(4) == b"GGUF":
                return path, min(r.offset for r in regions)
    raise ValueError("mmap (memory-mapped weights) needs a GGUF model file; convert a Hugging Face "
                     "directory first (`tritlm convert`)")


def _stacked_shape(stack: dict) -> tuple[int, int]:
    return sum(t.shape[0] for t in stack.values()), next(iter(stack.values())).shape[1]


class _Arena:
    """One buffer holding every weight a step streams, handed out in consecutive 64-byte-aligned
    pieces, each filled as it is taken: huge-page memory, or a writable map of a weight cache's
    file being built (`buffer`)."""

    def __init__(self, sizes: list[int], buffer: np.ndarray | None = None):
        self.buffer = _native.empty_streaming(self.nbytes_of(sizes)) if buffer is None else buffer
        self.offset = 0
        self.scales = []  # each packed matrix's row scales, in order: what a weight cache keeps beside

    @classmethod
    def nbytes_of(cls, sizes: list[int]) -> int:
        return sum(map(cls._aligned, sizes))

    @staticmethod
    def _aligned(nbytes: int) -> int:
        return -(-nbytes // 64) * 64

    def take(self, nbytes: int) -> np.ndarray:
        start = self.offset
        self.offset += self._aligned(nbytes)
        return self.buffer[start : start + nbytes]

    def copy_of(self, matrix: FloatMatrix, drop_behind: bool) -> FloatMatrix:
        matrix.read_into(data := self.take(matrix.nbytes), drop_behind=drop_behind)
        return FloatMatrix(data, matrix.type, matrix.rows, matrix.cols)

    def pack(self, stack: dict, layout: str, drop_behind: bool, n_threads: int) -> TernaryMatrix:
        """The tensors of `stack` stacked by rows, packed from their bytes into the next piece."""
        out = self.take(TernaryMatrix.nbytes_of(_stacked_shape(stack), layout))
        matrix = TernaryMatrix.stack([_part(name, t, drop_behind) for name, t in stack.items()], layout, out=out,
                                     n_threads=n_threads)
        self.scales.append(matrix.scale)
        return matrix


class _MappedArena(_Arena):
    """The same pieces already filled: a read-only map of a weight cache's arena bytes and its row
    scales (runtime/weight_cache.py). Nothing is read from the model file."""

    def __init__(self, buffer: np.ndarray, row_scales: np.ndarray):
        super().__init__([], buffer)
        self.row_scales, self.row = row_scales, 0

    def copy_of(self, matrix: FloatMatrix, drop_behind: bool) -> FloatMatrix:
        return FloatMatrix(self.take(matrix.nbytes), matrix.type, matrix.rows, matrix.cols)

    def pack(self, stack: dict, layout: str, drop_behind: bool, n_threads: int) -> TernaryMatrix:
        shape = _stacked_shape(stack)
        scale, self.row = self.row_scales[self.row : self.row + shape[0]], self.row + shape[0]
        return TernaryMatrix.of_tiles(self.take(TernaryMatrix.nbytes_of(shape, layout)), shape, layout, scale)


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
    stream fastest on this CPU (`kernels.best_layout`), whatever layout the file holds.

    mmap: the weights are not copied into memory but mapped read-only from a cache file of the
    packed arena (runtime/weight_cache.py), written at the first load: later starts read nothing,
    and a model larger than the memory runs from the page cache (GGUF files only)."""

    def __init__(self, config: ModelConfig, tensors: dict, *, n_ctx: int | None = None,
                 n_threads: int | None = None, kv_type: str = "f16", prefill_chunk: int = 256,
                 weight_layout: str | None = None, mmap: bool = False):
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
        # the file: a buffer per matrix would round each up to whole 2 MiB pages. (With mmap, the
        # same buffer lies in a cache file, mapped.)
        self.mmap = mmap
        tied = config.tied_embeddings or "output" not in tensors  # (an embedding model may have no head)
        head = tensors["token_embd" if tied else "output"]
        floats = [head] if tied else [head, tensors["token_embd"]]
        arch = config.architecture
        # [(group key, input norm name, {tensor name: tensor})] of each layer, every layer alike
        plan = [[(key, arch.input_norms.get(names[0]), {f"blk.{i}.{n}": tensors[f"blk.{i}.{n}"] for n in names})
                 for key, group in stacks(arch).items() for names in group] for i in range(config.n_layers)]
        layout = [weight_layout or kernels.best_layout(self.isa, _stacked_shape(stack)[1]) for _, _, stack in plan[0]]
        nbytes = [TernaryMatrix.nbytes_of(_stacked_shape(stack), lay) for (_, _, stack), lay in zip(plan[0], layout)]
        # Refused before anything big is allocated if it cannot fit. Where the arena and the
        # file's pages would not both fit, each tensor's pages are dropped from the page cache
        # behind its read: the arena is the only copy, and loading a 17 GB file does not push
        # everything else out of memory (smaller models keep theirs: a reload is then quicker).
        need, available = self._check_memory(plan[0], layout, floats)
        copied = need.weights + need.floats + need.kv + need.scratch  # (with mmap: the cache's pages)
        drop = available is not None and copied + sum(_file_bytes(t) for t in tensors.values()) > available
        sizes = [f.nbytes for f in floats] + nbytes * config.n_layers
        self.weight_cache = None  # with mmap: the cache file's path
        if mmap:
            arena = self._mapped_arena(tensors, floats, plan, layout, sizes, drop)
        else:
            arena = _Arena(sizes)
        self._fill(arena, tensors, floats, plan, layout, drop)
        c = config
        dims = {"hidden": c.hidden_size, "ffn": c.intermediate_size, "heads": c.n_heads,
                "kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab": c.vocab_size,
                "eps": c.norm_eps, "attention_scale": c.attention_scale, "neox": c.rope_style == "neox",
                "activation": arch.activation,
                "embedding_scale": float(np.float32(np.sqrt(c.hidden_size))) if arch.embedding_scale else 1.0}
        layers = [layer.norms | {"qkv": layer.qkv, "attn_output": layer.attn_output, "gate_up": layer.gate_up,
                                 "ffn_down": layer.ffn_down, "theta": c.theta(i), "window": c.window(i)}
                  for i, layer in enumerate(self.layers)]
        self._model = _native.Model(dims, layers, self.embedding.data, self.embedding.type, self.head.data,
                                    self.head.type, np.ascontiguousarray(tensors["output_norm"], dtype=np.float32))

    def _fill(self, arena: _Arena, tensors: dict, floats: list, plan: list, layout: list[str],
              drop: bool) -> None:
        """Take every streamed weight from `arena` in its fixed order (`floats`: the head, and the
        embedding unless tied; then each layer's groups), filling it (or, mapped, finding it there)."""
        self.weights = arena.buffer  # uint8: every weight a step streams
        self.head = arena.copy_of(floats[0], drop)
        self.embedding = self.head if len(floats) == 1 else arena.copy_of(floats[1], drop)
        arch = self.config.architecture
        self.layers = []
        for i, layer in enumerate(plan):
            groups = {key: [] for key in GROUPS}
            for (key, norm, stack), lay in zip(layer, layout):
                groups[key].append((tensors[f"blk.{i}.{norm}"] if norm else None,
                                    arena.pack(stack, lay, drop, self.n_threads)))
            norms = {n: tensors[f"blk.{i}.{n}"] for n in BLOCK_NORMS if arch.has(n)}
            self.layers.append(Layer(norms, **groups))
        if arena.offset != arena.buffer.nbytes:
            raise AssertionError(f"the arena holds {arena.buffer.nbytes} bytes, {arena.offset} were taken")

    def _mapped_arena(self, tensors: dict, floats: list, plan: list, layout: list[str], sizes: list[int],
                      drop: bool) -> _MappedArena:
        """The arena as a read-only map of its weight cache, which is first written (filled by
        `_fill` through a writable map of the file) if there is none valid."""
        source, header_end = weight_cache_source(tensors)
        n_scales = sum(_stacked_shape(stack)[0] for _, _, stack in plan[0]) * self.config.n_layers

        def fill(buffer: np.ndarray, row_scales: np.ndarray) -> None:
            arena = _Arena(sizes, buffer)
            self._fill(arena, tensors, floats, plan, layout, drop)
            row_scales[:] = np.concatenate(arena.scales)

        buffer, row_scales, self.weight_cache = weight_cache.mapped(
            source, header_end, layout, self.config, _Arena.nbytes_of(sizes), n_scales, fill)
        return _MappedArena(buffer, row_scales)

    def memory_need(self, layer: list, layout: list[str], floats: list) -> memory.MemoryNeed:
        """What this engine allocates with the groups of one layer (`layer`: (key, norm, stack) as
        the constructor plans them; every layer alike) in `layout`: see `memory.MemoryNeed`."""
        c = self.config
        weights = sum(_Arena._aligned(TernaryMatrix.nbytes_of(_stacked_shape(stack), lay)) + 4 * _stacked_shape(stack)[0]
                      for (_, _, stack), lay in zip(layer, layout)) * c.n_layers  # (+ float32 row scales)
        shapes = [_stacked_shape(stack) for _, _, stack in layer]
        qd, kvd, d, f = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.hidden_size, c.intermediate_size
        max_k, max_m = max(k for _, k in shapes), max(m for m, _ in shapes)
        # a step of T tokens: model.cpp's float buffers, project()'s, the int8 activations, the logits
        per_token = 4 * (2 * d + qd + 2 * kvd + qd + qd + max(d, 2 * f) + f + 2 * max_k + max_m + c.vocab_size) + max_k
        step = min(self.prefill_chunk, self.n_ctx) * per_token
        load = max(sum(t.region.nbytes for t in stack.values() if isinstance(t, StoredTernary))
                   for _, _, stack in layer)  # one group's file bytes, read before it is packed
        return memory.MemoryNeed(weights=weights, floats=sum(_Arena._aligned(m.nbytes) for m in floats),
                                 kv=self.kv_bytes_per_token * self.n_ctx, scratch=max(step, load) + memory.SLACK)

    @property
    def kv_bytes_per_token(self) -> int:
        c = self.config
        return c.n_layers * 2 * c.n_kv_heads * c.head_dim * np.dtype(self.kv_dtype).itemsize

    def _check_memory(self, layer: list, layout: list[str], floats: list) -> tuple[memory.MemoryNeed, int | None]:
        """ValueError if the engine will not fit in the memory available, naming what would; else
        what it needs, and the bytes available (None: unknown)."""
        need = self.memory_need(layer, layout, floats)
        options = [("+".join(sorted(set(layout))), dataclasses.replace(need, mapped=self.mmap))]
        k_ok = all(_stacked_shape(stack)[1] % 256 == 0 for _, _, stack in layer)
        if k_ok and set(layout) != {"tiles5"} and not self.mmap:
            options.append(("weight_layout='tiles5' (--weight-layout tiles5: 1.6 bits per weight)",
                            self.memory_need(layer, ["tiles5"] * len(layout), floats)))
        if not self.mmap:  # the weights then stream from the page cache: they need not fit
            options.append(("mmap=True (--mmap: weights mapped from a cache file)",
                            dataclasses.replace(need, mapped=True)))
        return options[0][1], memory.check_fits(options, self.n_ctx, self.kv_bytes_per_token)

    def set_threads(self, n_threads: int) -> None:
        if n_threads < 1:
            raise ValueError(f"n_threads must be at least 1, got {n_threads}")
        self.n_threads = n_threads

    @property
    def decode_bytes(self) -> int:
        """Weight bytes one decode step reads: every ternary matrix and the output head."""
        return sum(m.nbytes for layer in self.layers for m in layer.matrices) + self.head.nbytes

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
        return self._chunked(batch, all_logits, hidden=False)

    def forward_hidden(self, batch: list[tuple[Sequence, list[int]]],
                       all_rows: bool | list[bool] = True) -> list[np.ndarray]:
        """As `forward`, but each sequence's final hidden states (the output norm's result, what
        the LM head reads: for embeddings), float32: [tokens, hidden] for every token, or [1,
        hidden] for its last one alone with all_rows=False (one flag for the batch, or one per
        sequence). Many texts in one batch are stacked into the same steps."""
        return self._chunked(batch, all_rows, hidden=True)

    def hidden_states(self, sequence: Sequence, tokens: list[int]) -> np.ndarray:
        """Append `tokens` to `sequence` and return their final hidden states, float32
        [len(tokens), hidden] (`forward_hidden` of one sequence)."""
        return self.forward_hidden([(sequence, tokens)])[0]

    def _chunked(self, batch: list[tuple[Sequence, list[int]]], every_row: bool | list[bool],
                 hidden: bool) -> list[np.ndarray]:
        """Steps of at most prefill_chunk tokens per sequence until every sequence's tokens are in;
        each sequence's rows of every token (its flag set) or of its last."""
        for seq, tokens in batch:
            self._check(seq, tokens)
        every = [every_row] * len(batch) if isinstance(every_row, bool) else list(every_row)
        if len(every) != len(batch):
            raise ValueError(f"{len(every)} row flags for {len(batch)} sequences")
        outputs = [[] for _ in batch]
        pending = [(i, seq, list(tokens)) for i, (seq, tokens) in enumerate(batch)]
        while pending:  # chunked prefill: at most prefill_chunk tokens per sequence per step
            step = [(i, seq, tokens[: self.prefill_chunk]) for i, seq, tokens in pending]
            done = [len(tokens) <= self.prefill_chunk for _, _, tokens in pending]
            keep = ["all" if every[i] else "last" if last else "none" for (i, _, _), last in zip(pending, done)]
            for (i, _, _), rows in zip(step, self._step([(s, t) for _, s, t in step], keep, hidden)):
                outputs[i].append(rows)
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
