"""BitLinear: quantization-aware training whose forward is exactly tritlm's inference arithmetic.

The forward computes what the engine computes (tritlm.quant.arithmetic): per-token int8
activations, absmean ternary weights, integer sums, rescaled in float32. The integer sums are
done by a float32 GEMM over integer-valued operands, which is exact (every partial sum is an
integer below 2**24), so an exported model gives the same matmul outputs, bit for bit. The
backward is the straight-through estimator: gradients flow as if through the dequantized values.
"""

from __future__ import annotations

import torch
from torch import nn

ACT_MAX_FLOOR = 1e-5
WEIGHT_MEAN_FLOOR = 1e-5


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): q = clamp(round_half_even(x * scale), -128, 127) as float32 integers, and
    scale = (float)(127 / max(1e-5, max|x|)) computed in double, per row (shape [..., 1])."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).double()
    scale = (127.0 / amax.clamp_min(ACT_MAX_FLOOR)).float()
    return torch.round(x.detach() * scale).clamp_(-128, 127), scale


def ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ternary, gamma): ternary = clamp(round_half_even(W / gamma), -1, 1) as float32,
    gamma = (float)max(mean|W|, 1e-5) with the mean in double."""
    w = weight.detach()
    gamma = w.abs().double().mean().clamp_min(WEIGHT_MEAN_FLOOR).float()
    return torch.round(w / gamma).clamp_(-1, 1), gamma


class _BitLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        q, scale = quantize_activations(x)
        ternary, gamma = ternarize(weight)
        ctx.save_for_backward(q, scale, ternary, gamma)
        return (q @ ternary.t()) / scale * gamma  # the engine's ((float)S - A) / s * w_scale

    @staticmethod
    def backward(ctx, grad):
        q, scale, ternary, gamma = ctx.saved_tensors
        grad_x = (grad @ ternary) * gamma  # straight through: d/dx of x @ (ternary * gamma).T
        grad_w = grad.reshape(-1, grad.shape[-1]).t() @ (q / scale).reshape(-1, q.shape[-1])
        return grad_x, grad_w


class BitLinear(nn.Linear):
    """A bias-free linear layer trained ternary: float32 master weights, quantized each forward."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BitLinearFunction.apply(x, self.weight)

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 ternary [out, in], float32 scale) exactly as the forward uses them."""
        ternary, gamma = ternarize(self.weight)
        return ternary.to(torch.int8), gamma


def fake_f16(weight: torch.Tensor) -> torch.Tensor:
    """The weight rounded to float16 (as the exported embedding is stored), straight through."""
    return weight + (weight.detach().half().float() - weight.detach())


__all__ = ["BitLinear", "quantize_activations", "ternarize", "fake_f16"]
