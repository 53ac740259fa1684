"""The BitNet b1.58 2B4T architecture in PyTorch, at any size, for training.

Block: RMSNorm -> q, k, v (BitLinear) -> NEOX RoPE -> causal GQA attention -> attn_sub_norm ->
o_proj -> residual; RMSNorm -> relu(gate)^2 * up -> ffn_sub_norm -> down_proj -> residual.
Final RMSNorm; logits = h @ embedding.T (tied). Parameter names follow transformers' BitNet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .quant import BitLinear, fake_f16


@dataclass
class ModelArgs:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    context_length: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 128:  # the row length of every ternary matrix (I2_S blocks)
                raise ValueError(f"{name} must be a multiple of 128, got {getattr(self, name)}")
        if self.hidden_size % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} heads / {self.n_kv_heads} KV heads do not divide "
                             f"hidden size {self.hidden_size}")
        if (self.hidden_size // self.n_heads) % 2:
            raise ValueError("the head dimension must be even (RoPE rotates pairs)")
        if min(self.vocab_size, self.n_layers, self.context_length) < 1:
            raise ValueError("vocab_size, n_layers and context_length must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def n_params(self) -> int:
        h, f, kv = self.hidden_size, self.intermediate_size, self.n_kv_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 3 * h + f
        return self.vocab_size * h + self.n_layers * per_layer + h

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(args: ModelArgs, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim]; angles in double as the engine's reference computes them."""
    d = args.head_dim
    inv_freq = args.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """NEOX rotation (pairs i and i + d/2) of x [batch, heads, tokens, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        h, kv = args.hidden_size, args.n_kv_heads * args.head_dim
        self.q_proj, self.k_proj = BitLinear(h, h), BitLinear(h, kv)
        self.v_proj, self.o_proj = BitLinear(h, kv), BitLinear(h, h)
        self.attn_sub_norm = RMSNorm(h, args.norm_eps)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        a = self.args
        q = self.q_proj(x).view(b, t, a.n_heads, a.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(self.attn_sub_norm(y.transpose(1, 2).reshape(b, t, -1)))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, f = args.hidden_size, args.intermediate_size
        self.gate_proj, self.up_proj, self.down_proj = BitLinear(h, f), BitLinear(h, f), BitLinear(f, h)
        self.ffn_sub_norm = RMSNorm(f, args.norm_eps)

    def forward(self, x):
        return self.down_proj(self.ffn_sub_norm(F.relu(self.gate_proj(x)).square() * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class BitNetModel(nn.Module):
    """Token ids [batch, tokens] -> logits [batch, tokens, vocab]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.hidden_size, args.norm_eps)
        cos, sin = rope_tables(args, args.context_length)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.args.context_length:
            raise ValueError(f"{t} tokens exceed the context length {self.args.context_length}")
        embedding = fake_f16(self.embed_tokens.weight)  # exported as F16: train with those values
        x = F.embedding(tokens, embedding)
        cos, sin = self.cos[:t], self.sin[:t]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x) @ embedding.t()

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy over tokens [batch, n + 1]."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
