"""The description every architecture file fills in: what one family of ternary transformers
computes, stated once. The loader reads its tensors and config keys from it, and the NumPy
reference (`reference.py`) and the C++ step (`csrc/model.cpp`) both run the one block below,
each step present or not as the description's tensors say.

The block, for the hidden states x of the tokens (every matrix ternary, behind an int8
quantization of its input; `norm` is RMSNorm):

    h = norm(x, attn_norm)
    q, k, v = attn_q(in(h)), attn_k(in(h)), attn_v(in(h))   in(): that projection's input norm, if any
    q, k = norm(q, attn_q_norm), norm(k, attn_k_norm)      per head, if present
    q, k = rope(q), rope(k)                                 theta of the layer's kind (full / sliding)
    a = attention(q, k, v)                                  causal; a sliding layer sees the last `window` keys
    o = attn_output(in(a))
    x = x + norm(o, post_attention_norm)                    the norm if present
    h = norm(x, ffn_norm)
    f = act(ffn_gate(in(h))) * ffn_up(in(h))
    d = ffn_down(in(f))
    x = x + norm(d, post_ffw_norm)                          the norm if present

then norm(x, output_norm): the hidden states that the LM head (token_embd, or output) reads,
and that embeddings pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

# Per-layer tensors a description may name, and the sizes of their shapes (NumPy order).
_Q, _KV = "n_heads*head_dim", "n_kv_heads*head_dim"
LAYER_SHAPES = {
    "attn_norm": ("hidden_size",), "attn_q": (_Q, "hidden_size"), "attn_k": (_KV, "hidden_size"),
    "attn_v": (_KV, "hidden_size"), "attn_q_norm": ("head_dim",), "attn_k_norm": ("head_dim",),
    "attn_output": ("hidden_size", _Q), "post_attention_norm": ("hidden_size",), "ffn_norm": ("hidden_size",),
    "ffn_gate": ("intermediate_size", "hidden_size"), "ffn_up": ("intermediate_size", "hidden_size"),
    "ffn_down": ("hidden_size", "intermediate_size"), "post_ffw_norm": ("hidden_size",),
    # norms right before a projection: BitNet's sub-norms, and the BitLinear input norms
    "attn_sub_norm": (_Q,), "ffn_sub_norm": ("intermediate_size",),
    **{f"{p}_norm_in": ((_Q,) if p == "attn_output" else ("intermediate_size",) if p == "ffn_down"
                        else ("hidden_size",)) for p in PROJECTIONS},
}
TOP_SHAPES = {"token_embd": ("vocab_size", "hidden_size"), "output_norm": ("hidden_size",),
              "output": ("vocab_size", "hidden_size")}
# Hugging Face names of the projections (after `model.layers.{i}.`), alike in every family
HF_PROJECTIONS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                  "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                  "ffn_down": "mlp.down_proj"}
ACTIVATIONS = ("relu2", "silu", "gelu_tanh")  # relu(g)^2, g * sigmoid(g), GELU's tanh approximation


@dataclass(frozen=True)
class Architecture:
    family: str
    gguf_archs: tuple[str, ...]  # general.architecture values of this family
    # each layer's tensors (GGUF names, all required), and their Hugging Face names after
    # `model.layers.{i}.` (without `.weight`)
    tensors: dict[str, str]
    activation: str  # of the FFN gate, one of ACTIVATIONS
    # projection -> the norm applied to its input alone (none for the others)
    input_norms: dict[str, str] = field(default_factory=dict)
    hf_aliases: dict[str, str] = field(default_factory=dict)  # other Hugging Face spellings -> tensor
    rope_style_gguf: str = "neox"  # pairs RoPE rotates in GGUF files: "neox" (i, i + d/2) or "norm" (2i, 2i + 1)
    offset_norms: tuple[str, ...] = ()  # norms stored as w that multiply by (1 + w) (Gemma's RMSNorm)
    embedding_scale: bool = False  # x = token_embd[id] * sqrt(hidden_size) (Gemma)

    def __post_init__(self):
        unknown = set(self.tensors) - set(LAYER_SHAPES)
        assert not unknown, f"{self.family}: unknown tensors {unknown}"
        assert self.activation in ACTIVATIONS
        assert set(self.input_norms) <= set(PROJECTIONS) and set(self.input_norms.values()) <= set(self.tensors)
        assert set(self.offset_norms) <= set(self.tensors) | {"output_norm"}

    def has(self, tensor: str) -> bool:
        return tensor in self.tensors
