"""Read a model's configuration and tensors from a GGUF file or a Hugging Face directory, under
GGUF tensor names: `blk.{i}.attn_q`, `token_embd`, ...

Ternary matrices come out as `TernaryTensor` (int8 ternary + one float32 scale per row); from a
GGUF file as `StoredTernary`, which keeps only where the bytes lie: the engine packs them to its
tiles in C++ straight from the file, and `.ternary` / `.scale` unpack them when asked. The token
embedding and output head come out as `FloatMatrix` (the stored bytes, F16 / Q6_K / ... as the
C++ ops read them); norms as float32 arrays."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..formats.gguf import GGUFFile
from ..formats.region import FileRegion
from ..formats.hf import HFCheckpoint, is_hf_directory
from ..quant import blocks, layouts, ternarize
from .config import ModelConfig, family_of

TERNARY_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass
class TernaryTensor:
    """weight = ternary * scale[row]"""

    ternary: np.ndarray  # int8 [M, K]
    scale: np.ndarray  # float32 [M]

    @property
    def shape(self) -> tuple[int, int]:
        return self.ternary.shape


class StoredTernary(TernaryTensor):
    """A ternary tensor where its file holds it: in one of `layouts.FILE_LAYOUTS`, or "HF"
    (Hugging Face's packed uint8 [M/4, K], whose scales, `row_scale`, are kept elsewhere)."""

    def __init__(self, layout: str, shape: tuple[int, int], region: FileRegion, row_scale=None):
        self.layout, self._shape, self.region, self.row_scale = layout, tuple(shape), region, row_scale

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    def __repr__(self) -> str:  # (the dataclass's would read and unpack the tensor)
        return f"StoredTernary({self.layout!r}, {self.shape}, {self.region})"

    @cached_property
    def _unpacked(self) -> tuple[np.ndarray, np.ndarray]:
        data = self.region.read()
        if self.layout == "HF":
            return layouts.unpack_hf(data.reshape(self.shape[0] // 4, -1)), self.row_scale
        _, unpack = layouts.FILE_LAYOUTS[self.layout]
        return unpack(data, self.shape)

    ternary = property(lambda self: self._unpacked[0])
    scale = property(lambda self: self._unpacked[1])


@dataclass
class FloatMatrix:
    """A [rows, cols] matrix kept as stored: the bytes of one GGUF type, in memory or in a file."""

    source: np.ndarray | FileRegion  # uint8
    type: str  # "F32", "F16", "BF16", "Q8_0", "Q6_K"
    rows: int
    cols: int

    @classmethod
    def from_array(cls, array: np.ndarray) -> FloatMatrix:
        a = np.ascontiguousarray(array, dtype=np.float32)
        return cls(a.reshape(-1).view(np.uint8), "F32", *a.shape)

    @property
    def nbytes(self) -> int:
        return self.source.nbytes

    @property
    def data(self) -> np.ndarray:
        """The bytes (read from the file each time, if they are there)."""
        return self.source.read() if isinstance(self.source, FileRegion) else self.source

    def read_into(self, out: np.ndarray) -> None:
        if isinstance(self.source, FileRegion):
            self.source.read_into(out)
        else:
            out[...] = self.source

    def to_array(self) -> np.ndarray:
        shape, data = (self.rows, self.cols), self.data
        if self.type == "F32":
            return data.view(np.float32).reshape(shape)
        convert = {"F16": blocks.f16_to_f32, "BF16": blocks.bf16_to_f32}.get(self.type)
        if convert:
            return convert(data.view(np.uint16)).reshape(shape)
        dequantize = {"Q8_0": blocks.dequantize_q8_0, "Q6_K": blocks.dequantize_q6_k}[self.type]
        return dequantize(data, shape)


# Hugging Face name (after `model.`) -> GGUF name; both spellings of the BitNet sub-norms
HF_NAMES = {
    r"embed_tokens": "token_embd",
    r"norm": "output_norm",
    r"layers\.(\d+)\.input_layernorm": r"blk.\1.attn_norm",
    r"layers\.(\d+)\.self_attn\.q_proj": r"blk.\1.attn_q",
    r"layers\.(\d+)\.self_attn\.k_proj": r"blk.\1.attn_k",
    r"layers\.(\d+)\.self_attn\.v_proj": r"blk.\1.attn_v",
    r"layers\.(\d+)\.self_attn\.o_proj": r"blk.\1.attn_output",
    r"layers\.(\d+)\.self_attn\.(?:attn_sub_norm|inner_attn_ln)": r"blk.\1.attn_sub_norm",
    r"layers\.(\d+)\.post_attention_layernorm": r"blk.\1.ffn_norm",
    r"layers\.(\d+)\.mlp\.gate_proj": r"blk.\1.ffn_gate",
    r"layers\.(\d+)\.mlp\.up_proj": r"blk.\1.ffn_up",
    r"layers\.(\d+)\.mlp\.down_proj": r"blk.\1.ffn_down",
    r"layers\.(\d+)\.mlp\.(?:ffn_sub_norm|ffn_layernorm)": r"blk.\1.ffn_sub_norm",
}


def gguf_name(hf_name: str) -> str | None:
    if hf_name == "lm_head":
        return "output"
    stem = hf_name.removeprefix("model.")
    for pattern, replacement in HF_NAMES.items():
        if re.fullmatch(pattern, stem):
            return re.sub(pattern, replacement, stem)
    return None


def hf_config(config: dict) -> ModelConfig:
    quant = config.get("quantization_config") or {}
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    if model_type == "bitnet":
        arch = "bitnet-b1.58" if config.get("hidden_act", "relu2") == "relu2" else "bitnet"
    elif "BitnetForCausalLM" in architectures:  # 1bitLLM's own modelling code
        arch = "bitnet"
    elif model_type == "llama" and quant.get("quant_method") == "bitnet":
        arch = "llama"
    else:
        raise ValueError(f"unsupported Hugging Face model (model_type={model_type!r}, "
                         f"architectures={architectures}); supported: BitNet (transformers' "
                         "BitNetForCausalLM), 1bitLLM BitnetForCausalLM, Llama with bitnet quantization")
    if quant.get("use_rms_norm"):
        raise ValueError("bitnet quantization_config.use_rms_norm is not supported yet")
    rope = config.get("rope_parameters") or {}
    n_heads = config["num_attention_heads"]
    return ModelConfig(
        arch=arch,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        context_length=config.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        head_dim=config.get("head_dim") or 0,
        rope_style="neox",  # transformers rotates halves
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def _hf_ternary(ckpt: HFCheckpoint, hf_name: str, out_features: int, quant: dict) -> TernaryTensor:
    info = ckpt.info(f"{hf_name}.weight")
    if info.dtype == "U8" and len(info.shape) == 2 and info.shape[0] * 4 == out_features:
        # packed: 4 rows per byte; weight_scale multiplies (autobitlinear) or divides (bitlinear)
        if f"{hf_name}.weight_scale" not in ckpt:
            raise ValueError(f"{hf_name}: packed weights without a weight_scale")
        ws = np.float32(ckpt.array(f"{hf_name}.weight_scale").reshape(-1)[0])
        scale = ws if quant.get("linear_class", "bitlinear") == "autobitlinear" else np.float32(1) / ws
        return StoredTernary("HF", (out_features, info.shape[1]), ckpt.region(f"{hf_name}.weight"),
                             np.full(out_features, scale, np.float32))
    weight = ckpt.array(f"{hf_name}.weight")
    if weight.dtype == np.float32 and weight.shape[0] == out_features:
        ternary, scale = ternarize(weight)  # master weights: absmean, as training does online
        return TernaryTensor(ternary, np.full(ternary.shape[0], scale, np.float32))
    raise ValueError(f"{hf_name}.weight: unexpected {weight.dtype} {weight.shape} for "
                     f"{out_features} output features")


def required_tensors(config: ModelConfig) -> list[str]:
    per_layer = ["attn_norm", *TERNARY_TENSORS, "ffn_norm"]
    if config.sub_norms:
        per_layer += ["attn_sub_norm", "ffn_sub_norm"]
    names = ["token_embd", "output_norm"] + ([] if config.tied_embeddings else ["output"])
    return names + [f"blk.{i}.{n}" for i in range(config.n_layers) for n in per_layer]


def check_complete(config: ModelConfig, tensors: dict) -> None:
    missing = [n for n in required_tensors(config) if n not in tensors]
    if missing:
        raise ValueError(f"the model lacks {len(missing)} tensors: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))


def load_hf(directory) -> tuple[ModelConfig, dict]:
    ckpt = HFCheckpoint(directory)
    try:
        config = hf_config(ckpt.config)
        quant = ckpt.config.get("quantization_config") or {}
        q_rows, kv_rows = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        out_features = {"attn_q": q_rows, "attn_k": kv_rows, "attn_v": kv_rows,
                        "attn_output": config.hidden_size, "ffn_gate": config.intermediate_size,
                        "ffn_up": config.intermediate_size, "ffn_down": config.hidden_size}
        tensors = {}
        for name in ckpt.names:
            if not name.endswith(".weight"):
                continue  # weight_scale tensors are read with their weights
            target = gguf_name(name.removesuffix(".weight"))
            if target is None:
                continue
            kind = target.rsplit(".", 1)[-1]
            if kind in TERNARY_TENSORS:
                tensors[target] = _hf_ternary(ckpt, name.removesuffix(".weight"), out_features[kind], quant)
            elif target in ("token_embd", "output"):
                tensors[target] = FloatMatrix.from_array(ckpt.array(name))
            else:  # a copy: the file's memory map closes below
                tensors[target] = np.array(ckpt.array(name), dtype=np.float32)
        check_complete(config, tensors)
        return config, tensors
    finally:
        ckpt.close()


def gguf_config(metadata: dict, tensor_names) -> ModelConfig:
    arch = metadata.get("general.architecture")
    family_of(arch)  # unsupported architectures stop here, with the list of supported ones

    def key(name, default=None):
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{name}")
        return value

    n_heads, hidden = int(key("attention.head_count")), int(key("embedding_length"))
    tokens = metadata.get("tokenizer.ggml.tokens")
    return ModelConfig(
        arch=arch,
        vocab_size=int(key("vocab_size", len(tokens) if tokens else None)),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        context_length=int(key("context_length")),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        head_dim=int(key("rope.dimension_count", hidden // n_heads)),
        # llama.cpp rotates (2i, 2i+1) for llama, whose converter permutes q and k to match;
        # the BitNet architectures rotate halves
        rope_style="norm" if family_of(arch) == "llama" else "neox",
        tied_embeddings="output.weight" not in tensor_names,
    )


def load_gguf(path) -> tuple[ModelConfig, dict, dict]:
    """(config, tensors, metadata) of a GGUF file."""
    with GGUFFile(path) as f:
        config = gguf_config(f.metadata, f.tensors)
        tensors = {}
        for name, info in f.tensors.items():
            stem = name.removesuffix(".weight")
            kind = stem.rsplit(".", 1)[-1]
            if info.type_name in layouts.FILE_LAYOUTS:
                if kind not in TERNARY_TENSORS:
                    raise ValueError(f"{name}: ternary type {info.type_name} where a float tensor belongs")
                tensors[stem] = StoredTernary(info.type_name, info.shape, f.region(name))
            elif kind in TERNARY_TENSORS:
                raise ValueError(f"{name}: type {info.type_name} is not ternary; tritlm runs ternary "
                                 "models (I2_S, TQ1_0, TQ2_0)")
            elif stem in ("token_embd", "output"):
                rows, cols = info.shape
                tensors[stem] = FloatMatrix(f.region(name), info.type_name, rows, cols)
            else:
                tensors[stem] = np.array(f.tensor_array(name), dtype=np.float32)
        check_complete(config, tensors)
        return config, tensors, dict(f.metadata)


def load(path) -> tuple[ModelConfig, dict, dict]:
    """A GGUF file or a Hugging Face directory: (config, tensors, metadata or config.json)."""
    if is_hf_directory(path):
        config, tensors = load_hf(path)
        return config, tensors, HFCheckpoint(path).config
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such model file or Hugging Face directory")
    return load_gguf(path)
