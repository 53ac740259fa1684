"""Export a trained model: a GGUF file (I2_S ternary weights, F16 embedding, arch bitnet-b1.58)
and a Hugging Face directory (packed uint8 + weight_scale, `autobitlinear`) that tritlm and
transformers' BitNetForCausalLM both load. The ternary values and scales are the ones the
training forward uses, so both files compute the same matmuls as the checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..models.config import ModelConfig
from ..models.export import write_gguf_model
from ..models.loader import FloatMatrix, TernaryTensor
from ..quant import layouts
from ..tokenizer import Tokenizer
from .model import BitNetModel
from .quant import BitLinear

# transformers name (within a layer) -> GGUF name
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.attn_sub_norm": "attn_sub_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.ffn_sub_norm": "ffn_sub_norm",
}


def model_config(model: BitNetModel) -> ModelConfig:
    a = model.args
    return ModelConfig(arch="bitnet-b1.58", vocab_size=a.vocab_size, hidden_size=a.hidden_size,
                       intermediate_size=a.intermediate_size, n_layers=a.n_layers,
                       n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, context_length=a.context_length,
                       rope_theta=a.rope_theta, norm_eps=a.norm_eps)


def _embedding(model: BitNetModel) -> np.ndarray:
    # the float16 values the forward trains with, stored exactly
    return model.embed_tokens.weight.detach().half().float().numpy()


def _float(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy().copy()


def engine_tensors(model: BitNetModel) -> dict:
    """The model under GGUF names, as tritlm's loader returns a model."""
    tensors = {"token_embd": FloatMatrix.from_array(_embedding(model)),
               "output_norm": _float(model.norm.weight)}
    for i, layer in enumerate(model.layers):
        for hf_name, gguf_name in _LAYER_NAMES.items():
            module = layer.get_submodule(hf_name)
            if isinstance(module, BitLinear):
                ternary, gamma = module.quantized()
                scale = np.full(ternary.shape[0], gamma.item(), np.float32)
                tensors[f"blk.{i}.{gguf_name}"] = TernaryTensor(ternary.numpy(), scale)
            else:
                tensors[f"blk.{i}.{gguf_name}"] = _float(module.weight)
    return tensors


def export_gguf(model: BitNetModel, tokenizer: Tokenizer, path, name: str = "tritlm") -> None:
    metadata = tokenizer.gguf_metadata() | {"general.name": name}
    write_gguf_model(path, model_config(model), engine_tensors(model), ternary_type="I2_S",
                     embedding_type="F16", extra_metadata=metadata)


def export_hf(model: BitNetModel, tokenizer_dir, directory) -> None:
    """A transformers BitNet checkpoint: packed ternary weights, W = ternary * weight_scale."""
    from safetensors.numpy import save_file

    a = model.args
    # float16 holds the trained embedding exactly (the forward rounds it so)
    tensors = {"model.embed_tokens.weight": _embedding(model).astype(np.float16),
               "model.norm.weight": _float(model.norm.weight)}
    for name, module in model.named_modules():
        if isinstance(module, BitLinear):
            ternary, gamma = module.quantized()
            tensors[f"model.{name}.weight"] = layouts.pack_hf(ternary.numpy())
            tensors[f"model.{name}.weight_scale"] = np.array([gamma.item()], np.float32)
        elif name.endswith("norm") and name != "norm":
            tensors[f"model.{name}.weight"] = _float(module.weight)
    tok = Tokenizer.from_hf(tokenizer_dir)
    config = {
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet",
        "vocab_size": a.vocab_size, "hidden_size": a.hidden_size,
        "intermediate_size": a.intermediate_size, "num_hidden_layers": a.n_layers,
        "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads,
        "head_dim": a.head_dim, "max_position_embeddings": a.context_length,
        "rms_norm_eps": a.norm_eps, "hidden_act": "relu2", "tie_word_embeddings": True,
        "rope_theta": a.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
        "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "torch_dtype": "float32",
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "offline"},
    }
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    Path(directory, "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(tokenizer_dir, name), Path(directory, name))
