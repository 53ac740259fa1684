"""Ternary Llama (Llama3-8B-1.58-100B-tokens, Falcon3-*-1.58bit, Falcon-E): the plain Llama
block, only its matrices ternary. llama.cpp's converter permutes q and k for RoPE on adjacent
pairs, so a GGUF file rotates (2i, 2i + 1); transformers rotates halves."""

from .arch import HF_PROJECTIONS, Architecture

LLAMA = Architecture(
    family="llama", gguf_archs=("llama",),
    tensors={"attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm",
             **HF_PROJECTIONS},
    activation="silu", rope_style_gguf="norm")
