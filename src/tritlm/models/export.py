"""Write a loaded model as a GGUF file in the published layouts, readable by bitnet.cpp (I2_S)
and llama.cpp (TQ1_0, TQ2_0), streaming one tensor at a time."""

from __future__ import annotations

import numpy as np

from ..formats.gguf import FILE_TYPES, GGUFValue, GGUFWriter, TensorType, ValueType
from ..quant import layouts
from .config import ModelConfig
from .loader import GGUF_KEYS, GGUF_POOLING, FloatMatrix, TernaryTensor

EMBEDDING_TYPES = ("F32", "F16")


def permute_for_norm_rope(t: TernaryTensor, n_heads: int) -> TernaryTensor:
    """Reorder each head's rows from rotate-half pairs (i, i + d/2) to adjacent pairs (2i, 2i+1),
    as llama.cpp's converter does for llama q and k, so NORM RoPE computes the same thing."""
    rows, cols = t.ternary.shape
    d = rows // n_heads
    order = np.arange(rows).reshape(n_heads, 2, d // 2).swapaxes(1, 2).reshape(rows)
    return TernaryTensor(t.ternary[order], t.scale[order])


def model_metadata(config: ModelConfig, ternary_type: str, name: str = "") -> dict:
    def u32_or_f32(value):  # llama.cpp reads the sizes as uint32
        return GGUFValue(value, ValueType.FLOAT32 if isinstance(value, float) else ValueType.UINT32)
    a, c = config.arch, config
    metadata = {"general.architecture": a, "general.name": name or a,
                "general.file_type": u32_or_f32(FILE_TYPES[ternary_type])} | {
        f"{a}.{key}": u32_or_f32(getattr(config, field)) for field, key in GGUF_KEYS.items()}
    metadata |= {f"{a}.attention.key_length": u32_or_f32(c.head_dim), f"{a}.attention.value_length": u32_or_f32(c.head_dim)}
    if c.embedding_only:
        metadata[f"{a}.pooling_type"] = u32_or_f32({v: k for k, v in GGUF_POOLING.items()}[c.pooling])
    if a == "gemma3":  # what the loader would otherwise assume
        metadata |= {f"{a}.attention.sliding_window": u32_or_f32(c.sliding_window),
                     f"{a}.attention.scale": u32_or_f32(c.attention_scale)}
    return metadata


def write_gguf_model(path, config: ModelConfig, tensors: dict, *, ternary_type: str = "I2_S",
                     embedding_type: str = "F16", extra_metadata: dict | None = None) -> None:
    if ternary_type not in layouts.FILE_LAYOUTS:
        raise ValueError(f"ternary_type must be one of {', '.join(layouts.FILE_LAYOUTS)}")
    if embedding_type not in EMBEDDING_TYPES:
        raise ValueError(f"embedding_type must be one of {', '.join(EMBEDDING_TYPES)}")
    pack, _ = layouts.FILE_LAYOUTS[ternary_type]
    norm_rope = config.family == "llama"  # the layout llama.cpp expects for llama files

    def encode(name, t):
        if isinstance(t, TernaryTensor):
            kind = name.rsplit(".", 1)[-1]
            if norm_rope and config.rope_style == "neox" and kind in ("attn_q", "attn_k"):
                t = permute_for_norm_rope(t, config.n_heads if kind == "attn_q" else config.n_kv_heads)
            return TensorType[ternary_type], t.shape, lambda: pack(t.ternary, t.scale)
        if isinstance(t, FloatMatrix):
            array = t.to_array()
            if embedding_type == "F16":
                return TensorType.F16, array.shape, lambda: array.astype(np.float16).view(np.uint8).reshape(-1)
            return TensorType.F32, array.shape, lambda: array.view(np.uint8).reshape(-1)
        array = np.ascontiguousarray(t, dtype=np.float32)
        if name.rsplit(".", 1)[-1] in config.architecture.offset_norms:  # stored as w, multiplied by 1 + w
            array = array - np.float32(1)
        return TensorType.F32, array.shape, lambda: array.view(np.uint8).reshape(-1)

    metadata = model_metadata(config, ternary_type) | (extra_metadata or {})
    entries = [(f"{name}.weight", *encode(name, t)) for name, t in tensors.items()]
    with GGUFWriter(path, metadata) as writer:
        for name, type_id, shape, _ in entries:
            writer.add_tensor_info(name, type_id, shape)
        for name, _, _, data in entries:
            writer.write_tensor_data(name, data())
