"""A memory-mapped safetensors reader: an 8-byte little-endian header length, a JSON header
naming each tensor's dtype, shape and byte range, then the data. Written here because the
safetensors package's NumPy loader cannot read BF16, the dtype most checkpoints ship in."""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass

import numpy as np

from ..quant.blocks import bf16_to_f32
from .files import close_map, parse_json

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
MAX_HEADER = 100 << 20  # the format's own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


class SafetensorsFile:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ValueError(f"{self.path}: too short for a safetensors file ({size} bytes)")
            # (the length itself stays out of the message: it is the file's first 8 bytes)
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > min(MAX_HEADER, size - 8):
                raise ValueError(f"{self.path}: the header length does not fit the file ({size} bytes): "
                                 "not a safetensors file, or a truncated one")
            header = parse_json(f.read(header_len), f"{self.path}: the header")
            if not isinstance(header, dict):
                raise ValueError(f"{self.path}: the header is not a JSON object")
            self.metadata = header.pop("__metadata__", None) or {}
            if not isinstance(self.metadata, dict):
                raise ValueError(f"{self.path}: __metadata__ is not a JSON object")
            self.tensors: dict[str, TensorInfo] = {}
            for name, entry in header.items():
                self.tensors[name] = self._parse(name, entry, 8 + header_len, size)
            # mapped once the header is known good; arrays handed out keep the map alive
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def _parse(self, name, entry, data_start, size) -> TensorInfo:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: its header entry is not a JSON object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ValueError(f"{where} has unsupported dtype {dtype!r:.40}; supported: {', '.join(DTYPES)}")
        # type() rather than isinstance: JSON's true and false are not dimensions
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**63 for d in shape):
            raise ValueError(f"{where}: shape must be a list of integers in [0, 2**63)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{where}: data_offsets must be two integers [begin, end], 0 <= begin <= end")
        begin, end = offsets
        nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize  # Python ints: no wrap-around
        if end - begin != nbytes:
            raise ValueError(f"{where} declares {end - begin} bytes, its shape {shape} and dtype "
                             f"{dtype} need {nbytes}")
        if data_start + end > size:
            raise ValueError(f"{where} runs past the end of the file (truncated download?)")
        return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored, zero-copy (BF16 as uint16)."""
        info = self.info(name)
        if self._map is None:
            raise ValueError(f"{self.path} is closed")
        data = np.frombuffer(self._map, np.uint8, info.end - info.begin, info.begin)
        return data.view(DTYPES[info.dtype]).reshape(info.shape)

    def array(self, name: str) -> np.ndarray:
        """The tensor with floating types widened to float32 (a copy for F16/BF16)."""
        info = self.info(name)
        data = self.raw(name)
        if info.dtype == "BF16":
            return bf16_to_f32(data)
        return data.astype(np.float32) if info.dtype in ("F16", "F64") else data

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ValueError(f"{self.path}: no tensor named {name!r}") from None

    def close(self):
        m, self._map = self._map, None
        if m is not None:
            close_map(m)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
