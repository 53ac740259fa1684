"""What distinguishes one ternary architecture from another, in one record."""

from __future__ import annotations

from dataclasses import dataclass

# GGUF architecture names tritlm runs, and the family each belongs to
ARCHITECTURES = {
    "bitnet-b1.58": "bitnet-b1.58",  # BitNet-b1.58-2B-4T
    "bitnet-25": "bitnet-b1.58",  # older uploads of the same model
    "bitnet": "bitnet",  # 1bitLLM bitnet_b1_58-large / -3B, dummy models
    "llama": "llama",  # Llama3-8B-1.58, Falcon3-*-1.58bit, Falcon-E
}


def family_of(arch: str) -> str:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unsupported architecture {arch!r}; supported: "
                         f"{', '.join(ARCHITECTURES)}") from None


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # a key of ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    context_length: int
    rope_theta: float
    norm_eps: float
    head_dim: int = 0  # 0: hidden_size // n_heads
    # RoPE pairs (i, i + head_dim/2) ("neox", HF's rotate_half) or (2i, 2i + 1) ("norm", GGUF llama)
    rope_style: str = "neox"
    tied_embeddings: bool = True

    def __post_init__(self):
        family_of(self.arch)
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.n_heads)
        if self.rope_style not in ("neox", "norm"):
            raise ValueError(f"rope_style must be 'neox' or 'norm', got {self.rope_style!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} query heads do not group over {self.n_kv_heads} KV heads")

    @property
    def family(self) -> str:
        return family_of(self.arch)

    @property
    def activation(self) -> str:
        """The FFN gate: relu(gate)^2 * up for BitNet b1.58 2B4T, silu(gate) * up otherwise."""
        return "relu2" if self.family == "bitnet-b1.58" else "silu"

    @property
    def sub_norms(self) -> bool:
        """BitNet blocks normalize the attention output and the FFN product before projecting."""
        return self.family in ("bitnet-b1.58", "bitnet")
