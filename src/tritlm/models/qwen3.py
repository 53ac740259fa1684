"""BitNet-embedding-0.6B: a Qwen3 block (q and k RMS-normed per head before RoPE) whose seven
projections are BitLinear layers, each RMS-norming its own input (`*_norm_in`) before the int8
quantization. Pooled as the files declare (sentence-transformers' Pooling module, GGUF
`pooling_type`), then L2-normalised.

GGUF: arch `qwen3` as bitnet.cpp's convert-bitnet-embedding-to-gguf.py writes it (I2_S, F16
norms, no output.weight, `qwen3.pooling_type`); Hugging Face: Qwen3Model with `*.norm` inside
each projection, sentence-transformers' modules.json beside it.
"""

from .arch import HF_PROJECTIONS, PROJECTIONS, Architecture

QWEN3 = Architecture(
    family="qwen3", gguf_archs=("qwen3",),
    tensors={"attn_norm": "input_layernorm",
             "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
             "ffn_norm": "post_attention_layernorm",
             **HF_PROJECTIONS,
             **{f"{p}_norm_in": f"{HF_PROJECTIONS[p]}.norm" for p in PROJECTIONS}},
    activation="silu",
    input_norms={p: f"{p}_norm_in" for p in PROJECTIONS})
