"""Write a loaded model as a GGUF file in the published layouts, readable by bitnet.cpp (I2_S)
and llama.cpp (TQ1_0, TQ2_0), streaming one tensor at a time."""

from __future__ import annotations

import numpy as np

from ..formats.gguf import FILE_TYPES, GGUFValue, GGUFWriter, TensorType, ValueType
from ..quant import blocks, layouts
from .config import ModelConfig
from .loader import FloatMatrix, TernaryTensor

EMBEDDING_TYPES = ("F32", "F16")


def permute_for_norm_rope(t: TernaryTensor, n_heads: int) -> TernaryTensor:
    """Reorder each head's rows from rotate-half pairs (i, i + d/2) to adjacent pairs (2i, 2i+1),
    as llama.cpp's converter does for llama q and k, so NORM RoPE computes the same thing."""
    rows, cols = t.ternary.shape
    d = rows // n_heads
    order = np.arange(rows).reshape(n_heads, 2, d // 2).swapaxes(1, 2).reshape(rows)
    return TernaryTensor(t.ternary[order], t.scale[order])


def model_metadata(config: ModelConfig, ternary_type: str, name: str = "") -> dict:
    a = config.arch
    u32 = lambda v: GGUFValue(int(v), ValueType.UINT32)  # noqa: E731  (llama.cpp reads these as uint32)
    f32 = lambda v: GGUFValue(float(v), ValueType.FLOAT32)  # noqa: E731
    return {
        "general.architecture": a,
        "general.name": name or a,
        "general.file_type": u32(FILE_TYPES[ternary_type]),
        f"{a}.vocab_size": u32(config.vocab_size),
        f"{a}.context_length": u32(config.context_length),
        f"{a}.embedding_length": u32(config.hidden_size),
        f"{a}.feed_forward_length": u32(config.intermediate_size),
        f"{a}.block_count": u32(config.n_layers),
        f"{a}.attention.head_count": u32(config.n_heads),
        f"{a}.attention.head_count_kv": u32(config.n_kv_heads),
        f"{a}.rope.dimension_count": u32(config.head_dim),
        f"{a}.rope.freq_base": f32(config.rope_theta),
        f"{a}.attention.layer_norm_rms_epsilon": f32(config.norm_eps),
    }


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
        return TensorType.F32, array.shape, lambda: array.view(np.uint8).reshape(-1)

    metadata = model_metadata(config, ternary_type) | (extra_metadata or {})
    entries = [(f"{name}.weight", *encode(name, t)) for name, t in tensors.items()]
    with GGUFWriter(path, metadata) as writer:
        for name, type_id, shape, _ in entries:
            writer.add_tensor_info(name, type_id, shape)
        for name, _, _, data in entries:
            writer.write_tensor_data(name, data())
