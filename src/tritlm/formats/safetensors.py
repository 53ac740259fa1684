"""A memory-mapped safetensors reader: an 8-byte little-endian header length, a JSON header
naming each tensor's dtype, shape and byte range, then the data. Written here because the
safetensors package's NumPy loader cannot read BF16, the dtype most checkpoints ship in."""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass

import numpy as np

from ..quant.blocks import bf16_to_f32

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
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > min(MAX_HEADER, size - 8):
                raise ValueError(f"{self.path}: header length {header_len} does not fit the file")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.path}: header is not valid JSON ({e})") from None
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self.tensors[name] = self._parse(name, entry, data_start, size)

    def _parse(self, name, entry, data_start, size) -> TensorInfo:
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{self.path}: tensor {name!r} has a malformed header entry") from None
        if dtype not in DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"{self.path}: tensor {name!r} has a bad shape {shape}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise ValueError(f"{self.path}: tensor {name!r} has bad data offsets")
        if end - begin != nbytes:
            raise ValueError(f"{self.path}: tensor {name!r} declares {end - begin} bytes, its "
                             f"shape {shape} and dtype {dtype} need {nbytes}")
        if data_start + end > size:
            raise ValueError(f"{self.path}: tensor {name!r} runs past the end of the file "
                             f"(truncated download?)")
        return TensorInfo(name, dtype, shape, data_start + begin, data_start + end)

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored, zero-copy (BF16 as uint16)."""
        info = self.info(name)
        data = np.frombuffer(self._map, np.uint8, info.end - info.begin, info.begin) if self._map \
            else np.zeros(0, np.uint8)
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
        if self._map is not None:
            self._map.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
