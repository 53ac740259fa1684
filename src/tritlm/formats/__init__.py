"""Model file formats: GGUF (own reader and streaming writer)."""

from .gguf import (GGUFFile, GGUFValue, GGUFWriter, TensorInfo, TensorType, ValueType,
                   tensor_nbytes, write_gguf)

__all__ = ["GGUFFile", "GGUFValue", "GGUFWriter", "TensorInfo", "TensorType", "ValueType",
           "tensor_nbytes", "write_gguf"]
