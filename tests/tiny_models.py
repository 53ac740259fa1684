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


# ---------------------------------------------------------------- BitNet-embedding (Qwen3, Gemma3)

EMBEDDING_FAMILIES = {  # family: (transformers config and model classes, config overrides)
    "qwen3": ("Qwen3Config", "Qwen3Model", dict(hidden_act="silu", rope_parameters={"rope_type": "default",
                                                                                     "rope_theta": 1e6})),
    "gemma3": ("Gemma3TextConfig", "Gemma3TextModel", dict(
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=48, sliding_window=8, num_hidden_layers=6,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1e6}})),
}


def _bitlinear_class():
    import torch

    class BitLinear(torch.nn.Module):
        """The published BitLinear: its own RMSNorm of the input, int8 absmax activations per
        token, absmean-ternary weights; float arithmetic, exact on these integers."""

        def __init__(self, linear, eps):
            super().__init__()
            self.weight, self.eps = linear.weight, eps
            self.norm = torch.nn.Module()
            self.norm.weight = torch.nn.Parameter(torch.ones(linear.in_features))

        def forward(self, x):
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm.weight
            scale = 127 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
            q = (x * scale).round().clamp(-128, 127)
            gamma = self.weight.abs().mean().clamp(min=1e-5)
            return torch.nn.functional.linear(q, (self.weight / gamma).round().clamp(-1, 1)) / scale * gamma

    return BitLinear


def _embedding_model(family: str, config: dict):
    """transformers' Qwen3Model / Gemma3TextModel with every projection a BitLinear."""
    import transformers

    config_class, model_class, _ = EMBEDDING_FAMILIES[family]
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
    bitlinear = _bitlinear_class()
    for layer in model.layers:
        for block, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                             (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(block, name, bitlinear(getattr(block, name), config["rms_norm_eps"]))
    return model.float().eval()


def write_bitnet_embedding(directory, family: str, seed: int = 0, **overrides) -> str:
    """A random BitNet-embedding model of `family` ("qwen3" or "gemma3") as published: a
    Hugging Face directory (float master weights, a `.norm` in every projection) with
    sentence-transformers' last-token pooling and a tokenizer. Norms and embeddings are f16
    values, so the GGUF conversion (F16 norms) holds the very same model."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    config = tiny_config(head_dim=64, num_hidden_layers=3, rms_norm_eps=1e-6,
                         num_key_value_heads=1 if family == "gemma3" else 2) | EMBEDDING_FAMILIES[family][2] | overrides
    if family == "gemma3":  # (Gemma names it hidden_activation)
        del config["hidden_act"]
    model = _embedding_model(family, config)
    tensors = {}
    for name, p in model.state_dict().items():
        value = p.detach().float()
        if name.endswith("norm.weight"):  # Gemma's own norms multiply by 1 + w, BitLinear's by w
            offset = family == "gemma3" and not name.endswith("proj.norm.weight")
            value = (0 if offset else 1) + 0.2 * torch.randn_like(value)
        elif name == "embed_tokens.weight":
            value = torch.randn_like(value)
        tensors[name] = value.half().float() if value.ndim == 1 or name == "embed_tokens.weight" else value
    os.makedirs(os.path.join(directory, "1_Pooling"), exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    config |= {"model_type": "qwen3" if family == "qwen3" else "gemma3_text",
               "architectures": [EMBEDDING_FAMILIES[family][1]]}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(directory, "modules.json"), "w") as f:
        json.dump([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                   {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}], f)
    with open(os.path.join(directory, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": config["hidden_size"], "pooling_mode_cls_token": False,
                   "pooling_mode_mean_tokens": False, "pooling_mode_lasttoken": True}, f)
    write_tokenizer(directory, config["vocab_size"])
    return str(directory)


def embedding_hidden_states(directory, tokens) -> np.ndarray:
    """The oracle: transformers' last_hidden_state of the model in `directory`, [tokens, hidden]."""
    import torch
    from safetensors.torch import load_file

    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    family = "qwen3" if config["model_type"] == "qwen3" else "gemma3"
    config = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    model = _embedding_model(family, config | {"attn_implementation": "eager"})
    model.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
    with torch.no_grad():
        return model(torch.tensor([list(tokens)])).last_hidden_state[0].numpy()


def convert_bitnet_embedding(directory, path) -> str:
    """The model in `directory` as bitnet.cpp's convert-bitnet-embedding(-270m)-to-gguf.py writes
    it: its tensor names, I2_S matrices (one absmean scale each), F16 embedding and norms (stored
    as in the checkpoint), no output.weight, key_length / value_length and pooling_type 3 (last)."""
    from safetensors.numpy import load_file

    from tritlm.formats.gguf import FILE_TYPES, GGUFValue, GGUFWriter, TensorType, ValueType

    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    arch = "qwen3" if config["model_type"] == "qwen3" else "gemma3"
    renames = {"input_layernorm": "attn_norm", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
    renames |= ({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                 "post_feedforward_layernorm": "post_ffw_norm"} if arch == "gemma3"
                else {"post_attention_layernorm": "ffn_norm"})
    tensors = []
    for name, value in load_file(os.path.join(directory, "model.safetensors")).items():
        stem = name.removesuffix(".weight")
        if stem == "embed_tokens":
            gguf = "token_embd"
        elif stem == "norm":
            gguf = "output_norm"
        else:
            _, i, rest = stem.split(".", 2)
            inner = rest.endswith(".norm")
            gguf = f"blk.{i}.{renames[rest.removesuffix('.norm')]}" + ("_norm_in" if inner else "")
        if value.ndim == 2 and gguf != "token_embd":
            ternary, gamma = ternarize(value)
            tensors.append((f"{gguf}.weight", TensorType.I2_S, value.shape, layouts.pack_i2s(ternary, gamma)))
        else:
            tensors.append((f"{gguf}.weight", TensorType.F16, value.shape, value.astype(np.float16)))
    u32 = lambda v: GGUFValue(v, ValueType.UINT32)  # noqa: E731
    head_dim, rope = config["head_dim"], config["rope_parameters"]
    metadata = {"general.architecture": arch, "general.file_type": u32(FILE_TYPES["I2_S"]),
                f"{arch}.block_count": u32(config["num_hidden_layers"]),
                f"{arch}.context_length": u32(config["max_position_embeddings"]),
                f"{arch}.embedding_length": u32(config["hidden_size"]),
                f"{arch}.feed_forward_length": u32(config["intermediate_size"]),
                f"{arch}.attention.head_count": u32(config["num_attention_heads"]),
                f"{arch}.attention.head_count_kv": u32(config["num_key_value_heads"]),
                f"{arch}.vocab_size": u32(config["vocab_size"]),
                f"{arch}.rope.dimension_count": u32(head_dim), f"{arch}.attention.key_length": u32(head_dim),
                f"{arch}.attention.value_length": u32(head_dim),
                f"{arch}.rope.freq_base": GGUFValue(rope.get("rope_theta", rope.get("full_attention", {}).get(
                    "rope_theta")), ValueType.FLOAT32),
                f"{arch}.attention.layer_norm_rms_epsilon": GGUFValue(config["rms_norm_eps"], ValueType.FLOAT32),
                f"{arch}.pooling_type": u32(3)}
    if arch == "gemma3":  # bitnet.cpp's converter writes neither: right for the 270M model (512, 256 = head_dim)
        metadata[f"{arch}.attention.sliding_window"] = u32(config["sliding_window"])
        metadata[f"{arch}.attention.scale"] = GGUFValue(config["query_pre_attn_scalar"] ** -0.5, ValueType.FLOAT32)
    with GGUFWriter(path, metadata) as writer:
        for name, type_id, shape, _ in tensors:
            writer.add_tensor_info(name, type_id, shape)
        for name, _, _, data in tensors:
            writer.write_tensor_data(name, data)
    return str(path)
