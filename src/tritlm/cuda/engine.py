"""The GPU engine: `tritlm.runtime.Engine`'s interface and arithmetic, on a CUDA device.

Built from the same loaded tensors as the CPU engine. Weights go to the device once: ternary
matrices stacked as on the CPU (q, k, v; gate, up) in the 2-bit "planes" layout of
`tritlm.cuda.kernels`; the token embedding as float32 (rows looked up exactly); the LM head as
float16 (the head kernel splits the float32 hidden states into two float16 halves, so only the
head's own rounding to float16 differs from the CPU: none for F16 heads, a few 1e-4 of
max|logit| for Q8_0 / Q6_K ones). Each sequence's
KV cache lives on the device; kernels find it through its address, so a step can mix sequences.

A decode step (one token from each of B sequences) replays a CUDA graph captured on first use
for B rounded up to a power of two: the whole step is one launch, each token's id, position and
cache address read from device memory; padding rows write into a one-position scratch cache.

device="cpu" runs the same kernels in Triton's interpreter (TRITON_INTERPRET=1): slow, for
tests without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..models.config import ModelConfig
from ..runtime.engine import GROUPS, Engine, Sequence
from . import kernels as K

KV_DTYPES = {"f16": torch.float16, "f32": torch.float32}
# the families whose block this step runs: BitNet's (sub-norms before o and down) and plain Llama's
CUDA_FAMILIES = ("bitnet-b1.58", "bitnet", "llama")


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: K.Matrix
    attn_sub_norm: torch.Tensor | None
    attn_output: K.Matrix
    ffn_norm: torch.Tensor
    gate_up: K.Matrix
    ffn_sub_norm: torch.Tensor | None
    ffn_down: K.Matrix


class CudaSequence(Sequence):
    """A sequence whose KV cache, [layers, 2, n_ctx, kv heads, head dim], is on the device."""

    def __init__(self, config: ModelConfig, n_ctx: int, kv_dtype: torch.dtype, device: torch.device):
        self.kv = torch.zeros((config.n_layers, 2, n_ctx, config.n_kv_heads, config.head_dim),
                              dtype=kv_dtype, device=device)
        self.n_ctx = n_ctx
        self.position = 0


def _device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        from . import require_cuda

        require_cuda()
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"device must be 'cuda' (or 'cpu' with TRITON_INTERPRET=1, for tests), got {device!r}")
    return dev


def _matrix(parts: list, name: str, device: torch.device) -> K.Matrix:
    """Ternary tensors stacked by rows, packed on the device."""
    codes = torch.cat([torch.from_numpy(np.ascontiguousarray(t.ternary)).to(device) for t in parts]) + 1
    scale = np.concatenate([np.broadcast_to(np.asarray(t.scale, np.float32), (t.shape[0],)) for t in parts])
    if not (np.isfinite(scale).all() and (scale >= 0).all()):
        raise ValueError(f"{name}: weight scales must be finite and non-negative")
    return K.Matrix(K.pack_codes(codes), torch.from_numpy(np.ascontiguousarray(scale)).to(device),
                    tuple(codes.shape))


def rope_tables(config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin float32 [context, head_dim / 2] of every position, as the CPU computes them:
    the angle position * theta^(-2i/d) in double, then cos and sin rounded to float."""
    d = config.head_dim
    inv_freq = config.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.arange(config.context_length, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class CudaEngine(Engine):
    """Engine on a CUDA device: same constructor (n_threads is accepted and unused), forward,
    hidden_states and new_sequence; logits come back as NumPy arrays."""

    def __init__(self, config: ModelConfig, tensors: dict, *, n_ctx: int | None = None,
                 n_threads: int | None = None, kv_type: str = "f16", prefill_chunk: int = 256,
                 device: str = "cuda", cuda_graph: bool = True):
        if kv_type not in KV_DTYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_DTYPES)}, got {kv_type!r}")
        if config.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {config.head_dim}")
        if config.family not in CUDA_FAMILIES:
            raise ValueError(f"the {config.family} architecture does not run on CUDA yet; it runs on the CPU "
                             f"(CUDA: {', '.join(CUDA_FAMILIES)})")
        self.config = config
        self.n_ctx = n_ctx or config.context_length
        if not 0 < self.n_ctx <= config.context_length:
            raise ValueError(f"n_ctx must be between 1 and the model's context {config.context_length}")
        self.device = _device(device)
        self.kv_dtype = KV_DTYPES[kv_type]
        self.prefill_chunk = prefill_chunk
        self.set_threads(n_threads or 1)
        dev = self.device
        floats = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dev)  # noqa: E731
        embedding = tensors["token_embd"].to_array()
        self.embedding = floats(embedding)
        head = embedding if config.tied_embeddings else tensors["output"].to_array()
        self.head = torch.from_numpy(np.ascontiguousarray(head, dtype=np.float32)).to(dev).half()
        del embedding, head
        self.output_norm = floats(tensors["output_norm"])
        self.layers = []
        for i in range(config.n_layers):
            matrices = {key: _matrix([tensors[f"blk.{i}.{n}"] for n in names], f"blk.{i}.{key}", dev)
                        for key, names in GROUPS.items()}
            norms = {n: None if tensors.get(f"blk.{i}.{n}") is None else floats(tensors[f"blk.{i}.{n}"])
                     for n in ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm")}
            self.layers.append(Layer(**norms, **matrices))
        self.cos, self.sin = (floats(t) for t in rope_tables(config))
        self.cuda_graph = cuda_graph and dev.type == "cuda"
        self._graphs = {}  # batch size: (static inputs, graph, logits)
        self._padding = None

    @property
    def decode_bytes(self) -> int:
        """Weight bytes one decode step reads: every ternary matrix and the output head."""
        matrices = [m for layer in self.layers
                    for m in (layer.qkv, layer.attn_output, layer.gate_up, layer.ffn_down)]
        return sum(m.nbytes for m in matrices) + self.head.numel() * 2

    def new_sequence(self, n_ctx: int | None = None) -> CudaSequence:
        n_ctx = n_ctx or self.n_ctx
        if not 0 < n_ctx <= self.config.context_length:
            raise ValueError(f"n_ctx must be between 1 and the model's context {self.config.context_length}")
        return CudaSequence(self.config, n_ctx, self.kv_dtype, self.device)

    # ------------------------------------------------------------------------------ the step

    def _step(self, parts, keep, hidden=False):
        c = self.config
        for seq, _ in parts:
            if not (isinstance(seq, CudaSequence) and seq.kv.device == self.device and seq.kv.dtype == self.kv_dtype
                    and seq.kv.shape[0] == c.n_layers):
                raise ValueError("a sequence from another engine: make it with this engine's new_sequence")
        lengths = [len(t) for _, t in parts]
        seqs = [s for s, _ in parts]
        meta = np.stack([np.concatenate([np.asarray(t, np.int64) for _, t in parts]),
                         np.concatenate([np.arange(s.position, s.position + n) for s, n in zip(seqs, lengths)]),
                         np.repeat([s.kv.data_ptr() for s in seqs], lengths),
                         np.repeat([s.n_ctx * c.n_kv_heads * c.head_dim for s in seqs], lengths)]).astype(np.int64)
        bounds = np.cumsum([0] + lengths)
        rows = [np.arange(b, e) if k == "all" else np.arange(e - 1, e) if k == "last" else np.arange(0)
                for b, e, k in zip(bounds[:-1], bounds[1:], keep)]
        picked = np.concatenate(rows).astype(np.int64)
        if self.cuda_graph and not hidden and len(picked) == meta.shape[1] == len(parts):
            out = self._replay(meta)
        elif len(picked) == 0:
            self._run(torch.from_numpy(meta).to(self.device), None, hidden)
            out = np.zeros((0, c.hidden_size if hidden else c.vocab_size), np.float32)
        else:
            out = self._run(torch.from_numpy(meta).to(self.device), torch.from_numpy(picked).to(self.device),
                            hidden).cpu().numpy()
        for seq, tokens in parts:
            seq.position += len(tokens)
        return np.split(out, np.cumsum([len(r) for r in rows])[:-1])

    def _run(self, meta: torch.Tensor, rows: torch.Tensor | None, hidden: bool) -> torch.Tensor | None:
        """The whole model on the device for tokens meta = [ids, positions, cache addresses,
        cache planes] (int64 [4, T]); the hidden states or logits of `rows`."""
        c = self.config
        ids, positions, kv_addr, kv_plane = meta
        one = meta.shape[1] == 1  # one token: the GEMV, which reads the telescoped activations
        kv_f32 = self.kv_dtype == torch.float32
        relu2 = c.activation == "relu2"
        eps = c.norm_eps
        x = self.embedding.index_select(0, ids)
        for i, L in enumerate(self.layers):
            qkv = K.linear(K.quantize(x, L.attn_norm, eps, with_y=one), L.qkv)
            q = K.rope_and_cache(qkv, positions, kv_addr, kv_plane, self.cos, self.sin, i, c.n_heads,
                                 c.n_kv_heads, c.head_dim, c.rope_style == "neox", kv_f32)
            a = K.attention(q, positions, kv_addr, kv_plane, i, c.n_heads, c.n_kv_heads, c.head_dim, kv_f32)
            K.linear(K.quantize(a, L.attn_sub_norm, eps, with_y=one), L.attn_output, out=x, accumulate=True)
            gate_up = K.linear(K.quantize(x, L.ffn_norm, eps, with_y=one), L.gate_up)
            f = K.quantize(gate_up, L.ffn_sub_norm, eps, gated=True, relu2=relu2, with_y=one)
            K.linear(f, L.ffn_down, out=x, accumulate=True)
        if rows is None:
            return None
        h = K.rms_norm(x.index_select(0, rows), self.output_norm, eps)
        return h if hidden else K.head(h, self.head)

    def _replay(self, meta: np.ndarray) -> np.ndarray:
        """The logits of a decode step (one token per sequence) through the CUDA graph of its
        batch size rounded up to a power of two, captured on first use."""
        n = meta.shape[1]
        size = 1 << (n - 1).bit_length()
        if size not in self._graphs:
            self._graphs[size] = self._capture(size)
        static, graph, out = self._graphs[size]
        padded = np.repeat(self._padding, size, axis=1)
        padded[:, :n] = meta
        static.copy_(torch.from_numpy(padded))
        graph.replay()
        return out[:n].cpu().numpy()

    def _capture(self, size: int) -> tuple:
        if self._padding is None:  # token 0 at position 0 of a scratch cache
            scratch = self._scratch = self.new_sequence(n_ctx=1)
            plane = self.config.n_kv_heads * self.config.head_dim
            self._padding = np.array([[0], [0], [scratch.kv.data_ptr()], [plane]], np.int64)
        static = torch.from_numpy(np.repeat(self._padding, size, axis=1)).to(self.device)
        rows = torch.arange(size, device=self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # compile every kernel before capture
            self._run(static, rows, False)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._run(static, rows, False)
        return static, graph, out
