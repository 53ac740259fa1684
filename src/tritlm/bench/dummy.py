"""Models with random ternary weights at real shapes, for benchmarks: written one tensor at a
time, so a model far larger than memory can be made."""

from __future__ import annotations

import numpy as np

from ..formats.gguf import GGUFValue, GGUFWriter, TensorType, ValueType
from ..models.config import ModelConfig
from ..models.export import model_metadata
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
EMBEDDING_TYPES = ("F16", "Q8_0", "Q6_K")


def dummy_config(preset: str, arch: str = "bitnet-b1.58") -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
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


def random_embedding(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    """Random weights stored as `kind`: small values, valid block scales."""
    if kind == "F16":
        return (rng.standard_normal((rows, cols), np.float32) * 0.02).astype(np.float16)
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
    pack, _ = layouts.FILE_LAYOUTS[ternary_type]
    rng = np.random.default_rng(seed)
    c = config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"attn_q": (q, c.hidden_size), "attn_k": (kv, c.hidden_size), "attn_v": (kv, c.hidden_size),
              "attn_output": (c.hidden_size, q), "ffn_gate": (c.intermediate_size, c.hidden_size),
              "ffn_up": (c.intermediate_size, c.hidden_size), "ffn_down": (c.hidden_size, c.intermediate_size)}
    norms = {"attn_norm": c.hidden_size, "ffn_norm": c.hidden_size}
    if c.architecture.has("attn_sub_norm"):
        norms |= {"attn_sub_norm": c.n_heads * c.head_dim, "ffn_sub_norm": c.intermediate_size}
    tensors = [("token_embd.weight", TensorType[embedding_type], (c.vocab_size, c.hidden_size),
                lambda: random_embedding(embedding_type, c.vocab_size, c.hidden_size, rng)),
               ("output_norm.weight", TensorType.F32, (c.hidden_size,), lambda: np.ones(c.hidden_size, np.float32))]
    for i in range(c.n_layers):
        for name, shape in shapes.items():
            tensors.append((f"blk.{i}.{name}.weight", TensorType[ternary_type], shape,
                            lambda shape=shape: pack(random_ternary(shape, rng), np.float32(0.02))))
        for name, n in norms.items():
            tensors.append((f"blk.{i}.{name}.weight", TensorType.F32, (n,), lambda n=n: np.ones(n, np.float32)))
    metadata = (model_metadata(config, ternary_type, f"dummy-{c.hidden_size}x{c.n_layers}")
                | dummy_tokenizer_metadata(c.vocab_size))
    with GGUFWriter(path, metadata) as writer:
        for name, type_id, shape, _ in tensors:
            writer.add_tensor_info(name, type_id, shape)
        for name, _, _, data in tqdm(tensors, desc=f"writing {path}", unit="tensor", leave=False,
                                     disable=None if progress else True):
            writer.write_tensor_data(name, data())
    return config
