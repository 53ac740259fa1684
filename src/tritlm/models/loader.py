"""Read a model's configuration and tensors from a GGUF file or a Hugging Face directory, under
GGUF tensor names: `blk.{i}.attn_q`, `token_embd`, ...

Ternary matrices come out as `TernaryTensor` (int8 ternary + one float32 scale per row); from a
GGUF file as `StoredTernary`, which keeps only where the bytes lie: the engine packs them to its
tiles in C++ straight from the file, and `.ternary` / `.scale` unpack them when asked. The token
embedding and output head come out as `FloatMatrix` (the stored bytes, F16 / Q6_K / ... as the
C++ ops read them); norms as float32 arrays."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from itertools import islice

import numpy as np

from ..formats.gguf import GGUFFile
from ..formats.region import FileRegion
from ..formats.hf import HFCheckpoint, is_hf_directory
from ..quant import blocks, layouts, ternarize
from .arch import _KV, _Q, LAYER_SHAPES, PROJECTIONS, TOP_SHAPES, Architecture
from .config import ConfigError, ModelConfig, architecture_of, checked, is_kind, short

TERNARY_TENSORS = PROJECTIONS


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


# the types a FloatMatrix holds: values per block, bytes per block
FLOAT_TYPES = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (blocks.QK8_0, blocks.Q8_0_BLOCK_BYTES),
               "Q6_K": (blocks.QK_K, blocks.Q6_K_BLOCK_BYTES)}


@dataclass
class FloatMatrix:
    """A [rows, cols] matrix kept as stored: the bytes of one GGUF type, in memory or in a file."""

    source: np.ndarray | FileRegion  # uint8
    type: str  # a key of FLOAT_TYPES
    rows: int
    cols: int

    def __post_init__(self):
        # the C++ ops read rows x cols of `type` from these bytes: they must be exactly that many
        if self.type not in FLOAT_TYPES:
            raise ValueError(f"float matrix type must be one of {', '.join(FLOAT_TYPES)}, got {self.type!r}")
        block, block_bytes = FLOAT_TYPES[self.type]
        if self.rows < 1 or self.cols < 1 or self.cols % block:
            raise ValueError(f"a {self.type} matrix needs rows of a multiple of {block} values, "
                             f"got [{self.rows}, {self.cols}]")
        if self.nbytes != self.rows * self.cols // block * block_bytes:
            raise ValueError(f"a [{self.rows}, {self.cols}] {self.type} matrix takes "
                             f"{self.rows * self.cols // block * block_bytes} bytes, got {self.nbytes}")

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

    def read_into(self, out: np.ndarray, *, drop_behind: bool = False) -> None:
        """Fill `out` with the bytes (drop_behind: see `FileRegion.read_into`)."""
        if isinstance(self.source, FileRegion):
            self.source.read_into(out, drop_behind=drop_behind)
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


HF_TOP = {"embed_tokens": "token_embd", "norm": "output_norm"}  # Hugging Face name (after `model.`) -> GGUF
_HF_LAYER = re.compile(r"layers\.(0|[1-9][0-9]{0,7})\.(.+)")


def gguf_name(hf_name: str, arch: Architecture) -> str | None:
    """The GGUF name of a Hugging Face tensor (without `.weight`) in `arch`, or None."""
    if hf_name == "lm_head":
        return "output"
    stem = hf_name.removeprefix("model.")
    layer = _HF_LAYER.fullmatch(stem)
    if layer is None:
        return HF_TOP.get(stem)
    names = {hf: gguf for gguf, hf in arch.tensors.items()} | arch.hf_aliases
    return f"blk.{layer[1]}.{names[layer[2]]}" if layer[2] in names else None


# ModelConfig field -> its key in config.json, and in GGUF metadata (after "{arch}.")
HF_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
           "intermediate_size": "intermediate_size", "n_layers": "num_hidden_layers",
           "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
           "context_length": "max_position_embeddings", "rope_theta": "rope_theta",
           "norm_eps": "rms_norm_eps", "head_dim": "head_dim", "tied_embeddings": "tie_word_embeddings"}
GGUF_KEYS = {"vocab_size": "vocab_size", "hidden_size": "embedding_length",
             "intermediate_size": "feed_forward_length", "n_layers": "block_count",
             "n_heads": "attention.head_count", "n_kv_heads": "attention.head_count_kv",
             "context_length": "context_length", "rope_theta": "rope.freq_base",
             "norm_eps": "attention.layer_norm_rms_epsilon", "head_dim": "rope.dimension_count"}


def _model_config(where: str, keys: Mapping[str, str], **values) -> ModelConfig:
    """ModelConfig(**values), whose errors name the field as the file spells it (`keys`)."""
    try:
        return ModelConfig(**values)
    except ConfigError as e:
        key = keys.get(e.field, e.field)
        if e.value is None:
            raise ValueError(f"{where} lacks {key}") from None
        raise ValueError(f"{where}: {key} = {short(e.value)}: {e.problem}") from None


# Hugging Face activation names -> the description's
HF_ACTIVATIONS = {"relu2": "relu2", "silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
# sentence-transformers pooling modes -> ModelConfig.pooling
POOLING_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean"}
GEMMA3_WINDOW_EVERY = 6  # Gemma3: five sliding-window layers, then one full; its default pattern


def hf_config(config: dict, where: str = "config.json", pooling: str | None = None) -> ModelConfig:
    """pooling: a sentence-transformers model's ("last" or "mean"); with a base model (no
    *ForCausalLM class, so no LM head) it makes an embedding model."""
    checked(config, dict, where)

    def get(key, kind=None, default=None, within=config):  # null counts as absent, as in transformers
        value = within.get(key)
        if value is None:
            return default
        return value if kind is None else checked(value, kind, f"{where}: {key}")

    quant = get("quantization_config", dict, {})
    model_type, architectures = get("model_type", str), get("architectures", list, [])
    act_key = "hidden_activation" if model_type == "gemma3_text" else "hidden_act"
    if model_type == "bitnet":  # the activation tells 2B4T's block from 1bitLLM's
        activation = get(act_key, str, "relu2")
        arch = {"relu2": "bitnet-b1.58", "silu": "bitnet"}.get(activation)
    elif "BitnetForCausalLM" in architectures:  # 1bitLLM's own modelling code
        activation, arch = get(act_key, str, "silu"), "bitnet"
    elif model_type == "llama" and quant.get("quant_method") == "bitnet":
        activation, arch = get(act_key, str, "silu"), "llama"
    elif model_type in ("qwen3", "gemma3_text"):  # BitNet-embedding: told apart from float models by their tensors
        activation, arch = get(act_key, str, "silu" if model_type == "qwen3" else "gelu_pytorch_tanh"), model_type[:6]
    else:
        raise ValueError(f"unsupported Hugging Face model (model_type={short(model_type)}, "
                         f"architectures={short(architectures)}); supported: BitNet (transformers' "
                         "BitNetForCausalLM), 1bitLLM BitnetForCausalLM, Llama with bitnet quantization, "
                         "BitNet-embedding (qwen3, gemma3_text)")
    if arch is None or HF_ACTIVATIONS.get(activation) != architecture_of(arch).activation:
        raise ValueError(f"{where}: {act_key} {short(activation)} is not supported for "
                         f"model_type {short(model_type)}")
    if quant.get("use_rms_norm"):
        raise ValueError("bitnet quantization_config.use_rms_norm is not supported yet")
    if get("linear_class", str, "bitlinear", quant) not in ("bitlinear", "autobitlinear"):
        raise ValueError(f"{where}: quantization_config.linear_class must be 'bitlinear' or "
                         f"'autobitlinear', got {short(quant['linear_class'])}")
    rope = get("rope_parameters", dict, {})
    in_rope = rope.get("rope_theta") is not None  # (transformers' newer place for it)
    keys = HF_KEYS | ({"rope_theta": "rope_parameters.rope_theta"} if in_rope else {})
    n_heads, n_layers = get("num_attention_heads"), get("num_hidden_layers")
    options = {}
    layer_types = get("layer_types", list, [])
    if arch == "gemma3":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if get(key) is not None:
                raise ValueError(f"{where}: {key} is not supported")
        if get("use_bidirectional_attention", bool, False):
            raise ValueError(f"{where}: bidirectional attention is not supported")
        if not layer_types and is_kind(n_layers, int):
            every = get("sliding_window_pattern", int, GEMMA3_WINDOW_EVERY)
            layer_types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n_layers)]
        head_dim = get("head_dim", default=256)
        theta_of = {kind: get("rope_theta", default=None, within=get(kind, dict, {}, rope))
                    for kind in ("full_attention", "sliding_attention")}
        options = dict(attention_scale=get("query_pre_attn_scalar", float, head_dim) ** -0.5,
                       sliding_window=get("sliding_window", int, 4096),
                       sliding_layers=tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention"),
                       rope_theta_sliding=theta_of["sliding_attention"] or get("rope_local_base_freq", default=10000.0))
        if theta_of["full_attention"]:
            rope, in_rope = {"rope_theta": theta_of["full_attention"]}, True
    elif "sliding_attention" in layer_types:
        raise ValueError(f"{where}: sliding-window attention is not supported for model_type {short(model_type)}")
    return _model_config(
        where, keys,
        arch=arch,
        vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=get("num_key_value_heads", default=n_heads),
        context_length=get("max_position_embeddings", default=2048),
        rope_theta=rope["rope_theta"] if in_rope else get("rope_theta", default=10000.0),
        norm_eps=get("rms_norm_eps", default=1e-6),
        head_dim=get("head_dim", default=0),
        rope_style="neox",  # transformers rotates halves
        tied_embeddings=get("tie_word_embeddings", default=False),
        pooling=pooling or "mean",
        embedding_only=pooling is not None and not any(str(a).endswith("ForCausalLM") for a in architectures),
        **options,
    )


_LAYER_TENSOR = re.compile(r"blk\.(0|[1-9][0-9]{0,7})\.(\w+)")


def _needed(config: ModelConfig) -> tuple[list[str], list[str]]:
    """The tensors `config` needs: outside the layers, and in each layer."""
    head = not (config.tied_embeddings or config.embedding_only)  # (an embedding model needs none)
    return ["token_embd", "output_norm"] + ["output"] * head, list(config.architecture.tensors)


def required_tensors(config: ModelConfig) -> Iterator[str]:
    top, per_layer = _needed(config)
    yield from top
    for i in range(config.n_layers):
        yield from (f"blk.{i}.{kind}" for kind in per_layer)


def _sizes(c: ModelConfig, symbols: tuple[str, ...]) -> tuple[int, ...]:
    sizes = {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "head_dim": c.head_dim,
             "intermediate_size": c.intermediate_size, _Q: c.n_heads * c.head_dim, _KV: c.n_kv_heads * c.head_dim}
    return tuple(sizes[s] for s in symbols)


def tensor_shape(config: ModelConfig, kind: str) -> tuple[int, ...]:
    """The shape `config` gives a tensor, by its GGUF name without `blk.{i}.` (NumPy order)."""
    return _sizes(config, LAYER_SHAPES.get(kind) or TOP_SHAPES[kind])


def check_shapes(config: ModelConfig, shapes: Mapping[str, tuple]) -> None:
    """That `shapes` (GGUF tensor name -> NumPy shape) are exactly the tensors `config` needs,
    each of the shape the configuration gives it (any other shape would have the engine read past
    a buffer), before anything is built from them. An unknown tensor is an error too: it would be
    part of the model (a bias, RoPE factors, another layer) that tritlm leaves out."""
    c = config
    top, per_layer = _needed(c)
    unknown = []
    for name, shape in shapes.items():
        layer = _LAYER_TENSOR.fullmatch(name)
        if layer:
            known = int(layer[1]) < c.n_layers and layer[2] in per_layer
            symbols = LAYER_SHAPES[layer[2]] if known else None
        else:
            symbols = TOP_SHAPES[name] if name in top else None
        if symbols is None:
            unknown.append(name)
            continue
        expected = _sizes(c, symbols)
        if tuple(shape) != expected:
            raise ValueError(f"tensor {name} has shape {short(tuple(shape))}; the configuration needs "
                             f"{expected} = ({', '.join(symbols)})")
    if unknown:
        raise ValueError(f"{len(unknown)} tensors that are not part of this model "
                         f"({c.arch}, {c.n_layers} layers): {', '.join(map(short, unknown[:8]))}"
                         + (" ..." if len(unknown) > 8 else ""))
    n_needed = len(top) + c.n_layers * len(per_layer)  # (the names are counted, not listed)
    if len(shapes) < n_needed:
        missing = list(islice((n for n in required_tensors(c) if n not in shapes), 8))
        raise ValueError(f"the model lacks {n_needed - len(shapes)} tensors: {', '.join(missing)}"
                         + (" ..." if n_needed - len(shapes) > 8 else ""))


def _norm(name: str, array: np.ndarray, config: ModelConfig, target: str) -> np.ndarray:
    """A norm's weight as the engine multiplies by it: 1 + w for the norms Gemma stores as w."""
    norm = np.array(array, dtype=np.float32)  # a copy: the file's memory map closes
    if not np.isfinite(norm).all():
        raise ValueError(f"tensor {name}: a norm weight is not finite")
    if target.rsplit(".", 1)[-1] in config.architecture.offset_norms:
        norm += np.float32(1)
    return norm


_HF_FLOATS = ("F64", "F32", "F16", "BF16")


def _hf_ternary(ckpt: HFCheckpoint, hf_name: str, quant: dict) -> TernaryTensor:
    info = ckpt.info(f"{hf_name}.weight")
    if info.dtype == "U8":
        # packed: 4 rows per byte; weight_scale multiplies (autobitlinear) or divides (bitlinear)
        if f"{hf_name}.weight_scale" not in ckpt:
            raise ValueError(f"{hf_name}: packed weights without a weight_scale")
        ws = ckpt.array(f"{hf_name}.weight_scale").reshape(-1)
        if ws.size != 1 or not np.isfinite(ws[0]) or not ws[0] > 0:
            raise ValueError(f"{hf_name}.weight_scale must be one positive number, got {short(ws.tolist())}")
        ws = np.float32(ws[0])
        scale = ws if quant.get("linear_class", "bitlinear") == "autobitlinear" else np.float32(1) / ws
        return StoredTernary("HF", (4 * info.shape[0], info.shape[1]), ckpt.region(f"{hf_name}.weight"),
                             np.full(4 * info.shape[0], scale, np.float32))
    weight = ckpt.array(f"{hf_name}.weight")
    if not np.isfinite(weight).all():
        raise ValueError(f"{hf_name}.weight: master weights that are not finite")
    ternary, scale = ternarize(weight)  # master weights: absmean, as training does online
    return TernaryTensor(ternary, np.full(ternary.shape[0], scale, np.float32))


def _hf_redundant(name: str, config: ModelConfig) -> bool:
    """Tensors a checkpoint may hold beside the model's: a packed weight's scale (read with the
    weight), RoPE's inverse frequencies (computed), and the output head when the embeddings are
    tied (transformers replaces it with the embedding)."""
    if name.endswith(".weight_scale"):
        target = gguf_name(name.removesuffix(".weight_scale"), config.architecture)
        return target is not None and target.rsplit(".", 1)[-1] in TERNARY_TENSORS
    return name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight" and config.tied_embeddings


def sentence_pooling(directory) -> str | None:
    """The pooling of a sentence-transformers model (its modules.json names a Pooling module),
    or None for a model without one."""
    path = os.path.join(directory, "modules.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        modules = checked(json.load(f), list, path)
    for module in modules:
        if is_kind(module, dict) and str(module.get("type", "")).endswith("Pooling"):
            pooling_path = os.path.join(directory, str(module.get("path", "")), "config.json")
            with open(pooling_path, encoding="utf-8") as f:
                modes = checked(json.load(f), dict, pooling_path)
            chosen = [mode for mode, on in modes.items() if mode.startswith("pooling_mode") and on is True]
            if len(chosen) != 1 or chosen[0] not in POOLING_MODES:
                raise ValueError(f"{pooling_path}: pooling {short(chosen)} is not supported; supported: "
                                 f"{', '.join(POOLING_MODES)}")
            return POOLING_MODES[chosen[0]]
    return None


def sentence_prompts(directory) -> tuple[dict[str, str], str | None]:
    """A sentence-transformers model's named prompts (config_sentence_transformers.json: an
    instruction before queries, say) and the name of the one used by default, if any."""
    path = os.path.join(directory, "config_sentence_transformers.json")
    if not os.path.isfile(path):
        return {}, None
    with open(path, encoding="utf-8") as f:
        config = checked(json.load(f), dict, path)
    prompts = config.get("prompts") or {}
    if not is_kind(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ValueError(f"{path}: prompts must map names to strings")
    default = config.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ValueError(f"{path}: default_prompt_name {short(default)} is not one of the prompts")
    return prompts, default


def load_hf(directory) -> tuple[ModelConfig, dict]:
    ckpt = HFCheckpoint(directory)
    try:
        config = hf_config(ckpt.config, os.path.join(directory, "config.json"), sentence_pooling(directory))
        sources, shapes = {}, {}  # GGUF name -> Hugging Face name, and its shape
        for name in ckpt.names:
            if _hf_redundant(name, config):
                continue
            stem = name.removesuffix(".weight")
            target = gguf_name(stem, config.architecture) if name.endswith(".weight") else None
            info = ckpt.info(name)
            if target is None:
                shapes[name] = info.shape  # unknown: check_shapes names it
                continue
            if target in sources:
                raise ValueError(f"{directory}: {sources[target]}.weight and {name} are both {target}")
            ternary = target.rsplit(".", 1)[-1] in TERNARY_TENSORS
            packed = ternary and info.dtype == "U8"
            if not packed and info.dtype not in _HF_FLOATS:
                raise ValueError(f"{name}: dtype {info.dtype}; expected a float type ({', '.join(_HF_FLOATS)})"
                                 + (" or packed U8" if ternary else ""))
            if packed and len(info.shape) != 2:
                raise ValueError(f"{name}: packed ternary weights are [rows/4, columns], got {info.shape}")
            sources[target] = stem
            shapes[target] = (4 * info.shape[0], info.shape[1]) if packed else info.shape
        if config.family in ("qwen3", "gemma3") and "blk.0.attn_q_norm_in" not in shapes:
            raise ValueError(f"{directory}: a float {config.family} model; tritlm runs ternary models, of this "
                             "family BitNet-embedding (BitLinear projections, each with its own input norm)")
        check_shapes(config, shapes)
        quant = ckpt.config.get("quantization_config") or {}
        tensors = {}
        for target, stem in sources.items():
            kind = target.rsplit(".", 1)[-1]
            if kind in TERNARY_TENSORS:
                tensors[target] = _hf_ternary(ckpt, stem, quant)
            elif target in ("token_embd", "output"):
                tensors[target] = FloatMatrix.from_array(ckpt.array(f"{stem}.weight"))
            else:
                tensors[target] = _norm(f"{stem}.weight", ckpt.array(f"{stem}.weight"), config, target)
        return config, tensors
    finally:
        ckpt.close()


# llama.cpp's pooling types (`{arch}.pooling_type`) -> ModelConfig.pooling; 0 is none
GGUF_POOLING = {1: "mean", 3: "last"}
# bitnet.cpp's Gemma3 converter writes no sliding window (nor attention scale, which llama.cpp
# reads from `attention.scale`): Gemma3 270M's, the model it converts, whose scale is 1 / sqrt(head_dim)
GEMMA3_GGUF_WINDOW = 512


def gguf_config(metadata: dict, tensor_names, where: str = "GGUF metadata") -> ModelConfig:
    if "general.architecture" not in metadata:
        raise ValueError(f"{where} lacks general.architecture")
    arch = metadata["general.architecture"]
    description = architecture_of(arch)  # unsupported architectures stop here, with the list of supported ones
    keys = {field: f"{arch}.{key}" for field, key in GGUF_KEYS.items()}
    values = {field: metadata.get(key) for field, key in keys.items()}
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is not None:
        checked(tokens, list, f"{where}: tokenizer.ggml.tokens")
    defaults = {"vocab_size": None if tokens is None else len(tokens), "n_kv_heads": values["n_heads"],
                "rope_theta": 10000.0, "head_dim": metadata.get(f"{arch}.attention.key_length", 0)}
    values |= {field: default for field, default in defaults.items() if values[field] is None}
    pooling = metadata.get(f"{arch}.pooling_type", 0)
    if pooling and pooling not in GGUF_POOLING:
        raise ValueError(f"{where}: {arch}.pooling_type = {short(pooling)} is not supported; supported: "
                         + ", ".join(f"{k} ({v})" for k, v in GGUF_POOLING.items()))
    options = {}
    if arch == "gemma3":
        n_layers = values["n_layers"] if is_kind(values["n_layers"], int) else 0
        options = dict(sliding_window=metadata.get(f"{arch}.attention.sliding_window", GEMMA3_GGUF_WINDOW),
                       sliding_layers=tuple(i for i in range(n_layers) if (i + 1) % GEMMA3_WINDOW_EVERY),
                       rope_theta_sliding=10000.0, attention_scale=metadata.get(f"{arch}.attention.scale", 0.0))
        keys |= {"sliding_window": f"{arch}.attention.sliding_window", "attention_scale": f"{arch}.attention.scale"}
    config = _model_config(
        where, keys, arch=arch, **values, **options,
        rope_style=description.rope_style_gguf,
        tied_embeddings="output.weight" not in tensor_names,
        pooling=GGUF_POOLING.get(pooling, "mean"), embedding_only=bool(pooling),
    )
    if tokens is not None and config.vocab_size != len(tokens):
        raise ValueError(f"{where}: {keys['vocab_size']} = {config.vocab_size}, but "
                         f"tokenizer.ggml.tokens has {len(tokens)} tokens")
    return config


def load_gguf(path) -> tuple[ModelConfig, dict, dict]:
    """(config, tensors, metadata) of a GGUF file."""
    with GGUFFile(path) as f:
        config = gguf_config(f.metadata, f.tensors, os.fspath(path))
        infos = {}  # GGUF tensor name without ".weight" -> TensorInfo
        for name, info in f.tensors.items():
            stem = name.removesuffix(".weight")
            if stem in infos:
                raise ValueError(f"{path}: tensors {infos[stem].name!r} and {name!r} are both {stem}")
            infos[stem] = info
        check_shapes(config, {stem: info.shape for stem, info in infos.items()})
        tensors = {}
        for stem, info in infos.items():
            kind = stem.rsplit(".", 1)[-1]
            if info.type_name in layouts.FILE_LAYOUTS:
                if kind not in TERNARY_TENSORS:
                    raise ValueError(f"{info.name}: ternary type {info.type_name} where a float tensor belongs")
                tensors[stem] = StoredTernary(info.type_name, info.shape, f.region(info.name))
            elif kind in TERNARY_TENSORS:
                raise ValueError(f"{info.name}: type {info.type_name} is not ternary; tritlm runs ternary "
                                 "models (I2_S, TQ1_0, TQ2_0)")
            elif stem in ("token_embd", "output"):
                tensors[stem] = FloatMatrix(f.region(info.name), info.type_name, *info.shape)
            else:
                tensors[stem] = _norm(info.name, f.tensor_array(info.name), config, stem)
        return config, tensors, dict(f.metadata)


def load(path) -> tuple[ModelConfig, dict, dict]:
    """A GGUF file or a Hugging Face directory: (config, tensors, metadata or config.json)."""
    if is_hf_directory(path):
        config, tensors = load_hf(path)
        return config, tensors, HFCheckpoint(path).config
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such model file or Hugging Face directory")
    return load_gguf(path)
