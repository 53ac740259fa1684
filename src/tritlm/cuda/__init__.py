"""The GPU engine: ternary x int8 Triton kernels on CUDA (docs/GPU.md).

Imported only when a GPU engine is asked for: the CPU package never needs torch or Triton.
"""

from __future__ import annotations


def require_cuda() -> None:
    """Raise a ValueError naming what is missing when the GPU engine cannot run here."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as e:
        raise ValueError(f"device='cuda' needs PyTorch with CUDA and Triton ({e.name} is missing): "
                         "pip install 'tritlm[cuda]'") from None
    if not torch.cuda.is_available():
        raise ValueError("device='cuda': PyTorch sees no CUDA GPU here")
