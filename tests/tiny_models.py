"""Tiny random BitNet checkpoints written in the Hugging Face formats, with transformers as the
oracle that loads them. Shapes keep every matrix's row length a multiple of 128."""

from __future__ import annotations

import json
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' BitNet layers are torch.compile'd

import numpy as np  # noqa: E402

from tritlm.quant import layouts, ternarize  # noqa: E402

FLAVOURS = ("online", "autobitlinear", "bitlinear")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_config(**overrides) -> dict:
    config = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="relu2",
                  bos_token_id=1, eos_token_id=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config.update(overrides)
    return config


def write_bitnet(directory, flavour: str, seed: int = 0, model_type: str = "bitnet", **overrides) -> str:
    """A random transformers BitNetForCausalLM (or LlamaForCausalLM with BitNet-quantized linears,
    model_type="llama") saved as `flavour`:
    online        bf16 master weights, ternarized by absmean when loaded
    autobitlinear packed uint8 + weight_scale, W = ternary * weight_scale (as BitNet-2B-4T)
    bitlinear     packed uint8 + weight_scale, W = ternary / weight_scale
    """
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    config = tiny_config(**({"hidden_act": "silu"} if model_type == "llama" else {}) | overrides)
    config_class, model_class = _classes(model_type)
    model = model_class(config_class(**config))
    tensors = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and config["tie_word_embeddings"]:
            continue
        value = p.detach().float()
        if name.endswith("norm.weight"):  # make the norms matter
            value = 1 + 0.2 * torch.randn_like(value)
        elif name.endswith("embed_tokens.weight"):
            value = torch.randn_like(value)
        is_linear = name.rsplit(".", 2)[-2] in LINEARS
        if is_linear and flavour != "online":
            ternary, gamma = ternarize(value.numpy())
            tensors[name] = torch.from_numpy(layouts.pack_hf(ternary))
            scale = gamma if flavour == "autobitlinear" else 1 / gamma
            tensors[name.replace(".weight", ".weight_scale")] = torch.tensor([scale], dtype=torch.bfloat16)
        else:
            tensors[name] = value.to(torch.bfloat16)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    quant = {"quant_method": "bitnet", "linear_class": "bitlinear" if flavour == "bitlinear" else "autobitlinear",
             "quantization_mode": "online" if flavour == "online" else "offline"}
    config.update(model_type=model_type, architectures=[model_class.__name__], quantization_config=quant)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


def relative_error(ours, theirs) -> float:
    """max |difference| over max |oracle|: the measure the issue's tolerances use."""
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _classes(model_type: str):
    import transformers

    names = {"bitnet": ("BitNetConfig", "BitNetForCausalLM"), "llama": ("LlamaConfig", "LlamaForCausalLM")}
    return tuple(getattr(transformers, n) for n in names[model_type])


def transformers_logits(directory, tokens) -> np.ndarray:
    import torch

    with open(os.path.join(directory, "config.json")) as f:
        _, model_class = _classes(json.load(f)["model_type"])
    model = model_class.from_pretrained(directory, dtype=torch.float32)
    torch.nn.Module.float(model).eval()  # bf16 master weights would stay bf16 (transformers refuses .float())
    with torch.no_grad():
        return model(torch.tensor([list(tokens)])).logits[0].float().numpy()


SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
CORPUS = ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
          "The quick brown fox jumps over the lazy dog. Ünïcödé ☃ 日本語 0123456789 ") * 20


def write_tokenizer(directory, vocab_size: int = 320) -> str:
    """A byte-level BPE of exactly vocab_size tokens (Llama-3 style, with its special tokens)
    trained on a small corpus, saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([CORPUS], trainer)
    assert tokenizer.get_vocab_size() == vocab_size
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "add_bos_token": True}, f)
    return str(directory)
