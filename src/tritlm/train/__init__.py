"""Train small ternary (BitNet b1.58) models: `pip install tritlm[train]` (PyTorch).

BitLinear does quantization-aware training with exactly the engine's arithmetic, so exported
GGUF and Hugging Face files compute what the checkpoint computed.
"""

try:
    import torch  # noqa: F401  (fail here, with the way to install it)
except ImportError as e:  # pragma: no cover
    raise ImportError("tritlm.train needs PyTorch: pip install 'tritlm[train]'") from e

from .evaluate import perplexity
from .export import export_gguf, export_hf
from .model import BitNetModel, ModelArgs
from .quant import BitLinear
from .trainer import TrainOptions, load_checkpoint, train

__all__ = ["BitLinear", "BitNetModel", "ModelArgs", "TrainOptions", "train", "load_checkpoint",
           "export_gguf", "export_hf", "perplexity"]
