"""BitNet b1.58: a Llama block whose attention output and FFN product are RMS-normed again right
before their projections (the "sub-norms").

BitNet-b1.58-2B-4T (GGUF `bitnet-b1.58`, older uploads `bitnet-25`; transformers' BitNetForCausalLM)
gates its FFN with relu(gate)^2; 1bitLLM's bitnet_b1_58-large / -3B (GGUF `bitnet`; their own
BitnetForCausalLM) with SiLU. Both rotate halves in RoPE and tie nothing by default.
"""

from .arch import HF_PROJECTIONS, Architecture

_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_sub_norm": "self_attn.attn_sub_norm",  # 1bitLLM: self_attn.inner_attn_ln
    "ffn_norm": "post_attention_layernorm",
    "ffn_sub_norm": "mlp.ffn_sub_norm",  # 1bitLLM: mlp.ffn_layernorm
    **HF_PROJECTIONS,
}
_ALIASES = {"self_attn.inner_attn_ln": "attn_sub_norm", "mlp.ffn_layernorm": "ffn_sub_norm"}
_SUB_NORMS = {"attn_output": "attn_sub_norm", "ffn_down": "ffn_sub_norm"}

BITNET_B158 = Architecture(family="bitnet-b1.58", gguf_archs=("bitnet-b1.58", "bitnet-25"), tensors=_TENSORS,
                           activation="relu2", input_norms=_SUB_NORMS, hf_aliases=_ALIASES)
BITNET = Architecture(family="bitnet", gguf_archs=("bitnet",), tensors=_TENSORS, activation="silu",
                      input_norms=_SUB_NORMS, hf_aliases=_ALIASES)
