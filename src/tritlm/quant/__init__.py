"""NumPy reference of every number format and quantizer: slow, short, obviously right."""

from .arithmetic import code_sums, quantize_activations, ternarize, ternary_matmul
from .layouts import (FILE_LAYOUTS, convert, pack_hf, pack_i2s, pack_tiles, pack_tiles5, pack_tq1_0,
                      pack_tq2_0, tiles5_from_tq1_0, unpack_hf, unpack_i2s, unpack_tiles,
                      unpack_tiles5, unpack_tq1_0, unpack_tq2_0)

__all__ = [
    "FILE_LAYOUTS", "code_sums", "convert", "pack_hf", "pack_i2s", "pack_tiles", "pack_tiles5",
    "pack_tq1_0", "pack_tq2_0", "quantize_activations", "ternarize", "ternary_matmul",
    "tiles5_from_tq1_0", "unpack_hf", "unpack_i2s", "unpack_tiles", "unpack_tiles5", "unpack_tq1_0",
    "unpack_tq2_0",
]
