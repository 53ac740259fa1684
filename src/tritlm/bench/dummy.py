"""Models with random ternary weights at real shapes, for benchmarks: written one tensor at a
time (each made a chunk at a time), so a model far larger than memory can be made."""

from __future__ import annotations

import numpy as np

from ..formats.gguf import GGUFValue, GGUFWriter, TensorType, ValueType, tensor_nbytes
from ..models.config import ModelConfig
from ..models.arch import PROJECTIONS
from ..models.export import model_metadata
from ..models.loader import tensor_shape
from ..quant import layouts

# name -> hidden, ffn, layers, heads, kv heads, vocab: bitnet.cpp's dummy-model presets (no GQA,
# a 32000-token vocabulary) and the exact BitNet-b1.58-2B-4T shape
PRESETS = {
    "125M": (768, 3072, 11, 12, 12, 32000),
    "350M": (1024, 3072, 24, 16, 16, 32000),
    "1B": (2048, 3584, 24, 32, 32, 32000),
    "1.5B": (1536, 9216, 28, 32, 32, 32000),
    "2.7B": (3072, 7680, 24, 32, 32, 32000),
    "3.8B": (3840, 8192, 24, 32, 32, 32000),
    "7B": (4096, 12032, 32, 32, 32, 32000),
    "13B": (5120, 13824, 40, 40, 40, 32000),
    "30B": (6656, 16384, 60, 52, 52, 32000),
    "70B": (8192, 24576, 80, 64, 64, 32000),
    "100B": (8192, 45568, 72, 64, 64, 32000),
    "2B4T": (2560, 6912, 30, 20, 5, 128256),
}
# the BitNet-embedding models' shapes (their config.json), each of its own architecture
EMBEDDING_PRESETS = {
    "0.6B-embed": dict(arch="qwen3", vocab_size=151669, hidden_size=1024, intermediate_size=3072, n_layers=28,
                       n_heads=16, n_kv_heads=8, head_dim=128, rope_theta=1e6),
    "270M-embed": dict(arch="gemma3", vocab_size=262144, hidden_size=640, intermediate_size=2048, n_layers=18,
                       n_heads=4, n_kv_heads=1, head_dim=256, rope_theta=1e6, rope_theta_sliding=1e4,
                       sliding_window=512, sliding_layers=tuple(i for i in range(18) if (i + 1) % 6)),
}
EMBEDDING_TYPES = ("F16", "Q8_0", "Q6_K")


def dummy_config(preset: str, arch: str = "bitnet-b1.58") -> ModelConfig:
    """A preset's configuration; the embedding presets have their own architecture."""
    if preset in EMBEDDING_PRESETS:
        return ModelConfig(**EMBEDDING_PRESETS[preset], context_length=32768, norm_eps=1e-6, pooling="last",
                           embedding_only=True)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join([*PRESETS, *EMBEDDING_PRESETS])}")
    hidden, ffn, layers, heads, kv_heads, vocab = PRESETS[preset]
    return ModelConfig(arch=arch, vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=ffn, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                       context_length=4096, rope_theta=500000.0, norm_eps=1e-5)


def dummy_tokenizer_metadata(vocab_size: int) -> dict:
    """A byte-level vocabulary: the 256 byte tokens, the 2B4T special tokens, then fillers."""
    from ..tokenizer import _bytelevel_table

    pieces = sorted(_bytelevel_table(), key=_bytelevel_table().get)
    specials = {vocab_size - 3: "<|begin_of_text|>", vocab_size - 2: "<|end_of_text|>",
                vocab_size - 1: "<|eot_id|>"} if vocab_size < 128256 else \
        {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128009: "<|eot_id|>"}
    tokens = [pieces[i] if i < 256 else specials.get(i, f"[UNUSED{i}]") for i in range(vocab_size)]
    types = [1 if i < 256 else 3 if i in specials else 5 for i in range(vocab_size)]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": np.asarray(types, np.int32),
            "tokenizer.ggml.merges": GGUFValue([], ValueType.STRING),
            "tokenizer.ggml.bos_token_id": min(specials), "tokenizer.ggml.eos_token_id": sorted(specials)[1]}


def random_ternary(shape, rng) -> np.ndarray:
    return (rng.integers(0, 255, shape, dtype=np.uint8) % 3).astype(np.int8) - 1  # fast, near uniform


# the 81 bytes whose four 2-bit fields each hold a ternary code (0, 1, 2: weight -1, 0, +1), and a
# 16-bit random number -> one of them (x * 81 >> 16: within 0.2% of uniform)
_TERNARY_BYTES = np.array([a << 6 | b << 4 | c << 2 | d for a in range(3) for b in range(3)
                           for c in range(3) for d in range(3)], np.uint8)
_RANDOM_BYTE = _TERNARY_BYTES[(np.arange(1 << 16, dtype=np.uint32) * 81) >> 16]
CHUNK = 16 << 20  # weights generated at a time: bounds the memory a large tensor takes to make


def random_packed(ternary_type: str, shape: tuple[int, int], rng, scale=np.float32(0.02)) -> np.ndarray:
    """A random ternary tensor's bytes in a file layout, made CHUNK weights at a time. I2_S's 2-bit
    codes are drawn straight as bytes of four (no int8 weights, no packing: ~10x faster, for the
    70B / 100B presets); the other layouts pack rows a chunk at a time."""
    m, k = shape
    if ternary_type == "I2_S":
        if k % layouts.I2S_BLOCK:
            raise ValueError(f"I2_S needs rows of a multiple of {layouts.I2S_BLOCK} weights, got {shape}")
        n = m * k // 4
        out = np.empty(layouts.i2s_nbytes(shape), np.uint8)
        for start in range(0, n, CHUNK // 4):
            stop = min(n, start + CHUNK // 4)
            np.take(_RANDOM_BYTE, np.frombuffer(rng.bytes(2 * (stop - start)), np.uint16), out=out[start:stop])
        out[n:] = layouts.pack_i2s(np.zeros((1, layouts.I2S_BLOCK), np.int8), scale)[-layouts.I2S_TAIL :]
        return out
    pack, _ = layouts.FILE_LAYOUTS[ternary_type]  # TQ2_0, TQ1_0: blocks within rows
    rows = max(1, CHUNK // k)
    return np.concatenate([pack(random_ternary((min(rows, m - r), k), rng), scale) for r in range(0, m, rows)])


def random_embedding(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    """Random weights stored as `kind`: small values, valid block scales."""
    if kind == "F16":  # made CHUNK values at a time (a 70B embedding: 0.5 GB, not 1.6 GB of temporaries)
        out = np.empty((rows, cols), np.float16)
        step = max(1, CHUNK // cols)
        for r in range(0, rows, step):
            out[r : r + step] = rng.standard_normal((min(step, rows - r), cols), np.float32) * 0.02
        return out
    n_blocks = rows * cols // (32 if kind == "Q8_0" else 256)
    if kind == "Q8_0":  # f16 scale, then 32 int8
        blocks = rng.integers(-127, 128, (n_blocks, 34), dtype=np.int8).view(np.uint8)
        blocks[:, :2] = np.full((n_blocks, 1), 0.0005, np.float16).view(np.uint8)
        return blocks
    if kind == "Q6_K":  # 128 low bits, 64 high bits, 16 int8 scales, f16 scale
        blocks = rng.integers(0, 256, (n_blocks, 210), dtype=np.uint8)
        blocks[:, 192:208] = rng.integers(-32, 32, (n_blocks, 16), dtype=np.int8).view(np.uint8)
        blocks[:, 208:] = np.full((n_blocks, 1), 0.0001, np.float16).view(np.uint8)
        return blocks
    raise ValueError(f"embedding type must be one of {', '.join(EMBEDDING_TYPES)}, got {kind!r}")


def write_dummy(path, preset: str | ModelConfig = "2B4T", *, arch: str = "bitnet-b1.58",
                ternary_type: str = "I2_S", embedding_type: str = "F16", seed: int = 0,
                progress: bool = False) -> ModelConfig:
    """A GGUF of random ternary weights with the shape of `preset` (a name or a config), written
    one tensor at a time (progress: with a bar over them, on a terminal)."""
    from tqdm import tqdm

    config = preset if isinstance(preset, ModelConfig) else dummy_config(preset, arch)
    if ternary_type not in layouts.FILE_LAYOUTS:
        raise ValueError(f"ternary type must be one of {', '.join(layouts.FILE_LAYOUTS)}")
    if embedding_type not in EMBEDDING_TYPES:
        raise ValueError(f"embedding type must be one of {', '.join(EMBEDDING_TYPES)}")
    rng = np.random.default_rng(seed)
    c, arch = config, config.architecture
    norm = lambda kind: (lambda: np.full(tensor_shape(c, kind), 0 if kind in arch.offset_norms else 1, np.float32))  # noqa: E731
    tensors = [("token_embd.weight", TensorType[embedding_type], (c.vocab_size, c.hidden_size),
                lambda: random_embedding(embedding_type, c.vocab_size, c.hidden_size, rng)),
               ("output_norm.weight", TensorType.F32, (c.hidden_size,), norm("output_norm"))]
    for i in range(c.n_layers):
        for kind in arch.tensors:
            shape = tensor_shape(c, kind)
            if kind in PROJECTIONS:
                tensors.append((f"blk.{i}.{kind}.weight", TensorType[ternary_type], shape,
                                lambda shape=shape: random_packed(ternary_type, shape, rng)))
            else:
                tensors.append((f"blk.{i}.{kind}.weight", TensorType.F32, shape, norm(kind)))
    metadata = (model_metadata(config, ternary_type, f"dummy-{c.hidden_size}x{c.n_layers}")
                | dummy_tokenizer_metadata(c.vocab_size))
    # written out and dropped from the page cache as it goes: a 70B file leaves memory as it was
    with GGUFWriter(path, metadata, drop_behind=True) as writer:
        for name, type_id, shape, _ in tensors:
            writer.add_tensor_info(name, type_id, shape)
        sizes = [tensor_nbytes(type_id, shape) for _, type_id, shape, _ in tensors]
        with tqdm(total=sum(sizes), desc=f"writing {path}", unit="B", unit_scale=True, leave=False,
                  disable=None if progress else True) as bar:
            for (name, _, _, data), nbytes in zip(tensors, sizes):
                writer.write_tensor_data(name, data())
                bar.update(nbytes)
    return config
