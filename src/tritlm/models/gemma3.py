"""BitNet-embedding-270M: a Gemma3 block whose seven projections are BitLinear layers, each
RMS-norming its own input (`*_norm_in`) before the int8 quantization.

Gemma's habits: the embedding is scaled by sqrt(hidden_size); its RMSNorms multiply by (1 + w);
attention and FFN outputs are normed again before the residual (post norms); q and k are normed
per head; GELU (tanh approximation) gates the FFN; attention scales by query_pre_attn_scalar^-1/2;
five of every six layers attend to a sliding window of recent keys, with their own RoPE theta.
Pooled as the files declare (sentence-transformers' Pooling module, GGUF `pooling_type`).

GGUF: arch `gemma3` as bitnet.cpp's convert-bitnet-embedding-270m-to-gguf.py writes it (norms
copied as stored, so still w, not 1 + w); Hugging Face: Gemma3TextModel. Unchecked against the
published weights (not at hand): that their Gemma norms are stored as w, as transformers'
Gemma3RMSNorm reads them; the model card's printed vector would tell.
"""

from .arch import HF_PROJECTIONS, PROJECTIONS, Architecture

GEMMA_NORMS = ("attn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm",
               "output_norm")

GEMMA3 = Architecture(
    family="gemma3", gguf_archs=("gemma3",),
    tensors={"attn_norm": "input_layernorm",
             "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
             "post_attention_norm": "post_attention_layernorm",
             "ffn_norm": "pre_feedforward_layernorm",
             "post_ffw_norm": "post_feedforward_layernorm",
             **HF_PROJECTIONS,
             **{f"{p}_norm_in": f"{HF_PROJECTIONS[p]}.norm" for p in PROJECTIONS}},
    activation="gelu_tanh",
    input_norms={p: f"{p}_norm_in" for p in PROJECTIONS},
    offset_norms=GEMMA_NORMS,
    embedding_scale=True)
