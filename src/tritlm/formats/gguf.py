"""GGUF reader and streaming writer, including bitnet.cpp's ternary tensor types.

A GGUF file (v2/v3, little-endian) is: "GGUF", u32 version, u64 n_tensors, u64 n_kv; n_kv
metadata entries (string key, u32 value type, value); n_tensors tensor infos (string name,
u32 n_dims, u64 ne[n_dims], u32 tensor type, u64 offset); then the data section, which starts at
the next multiple of `general.alignment` (default 32). Strings are a u64 length + UTF-8 bytes;
arrays a u32 element type + u64 count + the elements. ne[0] is the row length, so the NumPy
shape is ne reversed. Tensor offsets are relative to the data section and aligned.

The `gguf` package cannot open bitnet.cpp's files (type 36, I2_S), hence this module.
"""

import math
import mmap
import os
import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from ..quant import blocks
from .files import close_map
from .region import FileRegion

MAGIC = b"GGUF"
VERSION = 3
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_NESTING = 8  # arrays of arrays this deep; a corrupt file could otherwise recurse forever


class ValueType(IntEnum):
    """Type of a metadata value."""
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


class TensorType(IntEnum):
    """Tensor types tritlm reads (ggml type ids; 36 is bitnet.cpp's)."""
    F32 = 0
    F16 = 1
    Q8_0 = 8
    Q6_K = 14
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    I2_S = 36


# elements per block, bytes per block
_BLOCKS = {TensorType.F32: (1, 4), TensorType.F16: (1, 2), TensorType.BF16: (1, 2),
           TensorType.Q8_0: (32, 34), TensorType.Q6_K: (256, 210), TensorType.TQ1_0: (256, 54),
           TensorType.TQ2_0: (256, 66), TensorType.I2_S: (128, 32)}
I2S_TAIL = 32  # I2_S: after the 2-bit codes, one 32-byte tail (its first 4 bytes: the f32 scale)
_LOOKUP_TABLE_TYPES = {38: "TL1", 39: "TL2", 42: "TL2"}  # bitnet.cpp; 39 is MXFP4 upstream
# general.file_type of a file whose matrices are mostly this ternary type (llama.h llama_ftype;
# 40 is bitnet.cpp's): without it llama.cpp and bitnet.cpp print the type as "guessed"
FILE_TYPES = {"TQ1_0": 36, "TQ2_0": 37, "I2_S": 40}

_NUMBERS = {ValueType.UINT8: "u1", ValueType.INT8: "i1", ValueType.UINT16: "<u2",
            ValueType.INT16: "<i2", ValueType.UINT32: "<u4", ValueType.INT32: "<i4",
            ValueType.UINT64: "<u8", ValueType.INT64: "<i8", ValueType.FLOAT32: "<f4",
            ValueType.FLOAT64: "<f8", ValueType.BOOL: "u1"}
# the fewest bytes one array element can take: bounds a claimed count by the bytes left
_MIN_SIZE = {**{t: np.dtype(d).itemsize for t, d in _NUMBERS.items()},
             ValueType.STRING: 8, ValueType.ARRAY: 12}
_INT_RANGES = {t: (int(np.iinfo(d).min), int(np.iinfo(d).max))
               for t, d in _NUMBERS.items() if np.dtype(d).kind in "iu" and t != ValueType.BOOL}


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def tensor_nbytes(type_id: int, shape, name: str = "?") -> int:
    """Bytes a tensor of `type_id` and NumPy `shape` takes in the file (without padding)."""
    if type_id in _LOOKUP_TABLE_TYPES:
        raise ValueError(f"tensor {name!r}: type {type_id} ({_LOOKUP_TABLE_TYPES[type_id]}, "
                         "bitnet.cpp's lookup-table layout) is not supported; convert the model "
                         "to I2_S with bitnet.cpp")
    if type_id not in _BLOCKS:
        raise ValueError(f"tensor {name!r}: unsupported tensor type id {type_id}")
    block, block_bytes = _BLOCKS[type_id]
    n = math.prod(shape)
    if type_id == TensorType.I2_S:
        # blocks of 128 run over the flattened tensor, whatever the row length
        if n % block:
            raise ValueError(f"tensor {name!r}: I2_S needs a multiple of {block} elements, got {n}")
        return n // block * block_bytes + I2S_TAIL
    if shape[-1] % block:
        raise ValueError(f"tensor {name!r}: {TensorType(type_id).name} needs the row length "
                         f"to be a multiple of {block}, got shape {tuple(shape)}")
    return n // block * block_bytes


@dataclass(frozen=True)
class GGUFValue:
    """A metadata value with its GGUF type. For an array (list, tuple or 1-D ndarray) `type` is
    the element type; an array of arrays has type ARRAY and holds lists or GGUFValues."""
    value: object
    type: ValueType


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: int
    type_name: str
    shape: tuple  # NumPy order: GGUF's ne reversed
    offset: int  # absolute, in the file
    nbytes: int


def _plain(v):
    """A GGUFValue as a plain Python value, arrays as lists."""
    if isinstance(v, GGUFValue):
        v = [_plain(x) for x in v.value] if v.type == ValueType.ARRAY else v.value
    return list(v) if isinstance(v, list) else v


# ------------------------------------------------------------------------------------ reader

class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> int:
        if n > self.left:
            raise ValueError(f"GGUF truncated: {what} needs {n} bytes at offset {self.pos}, "
                             f"{self.left} left in the file")
        self.pos += n
        return self.pos - n

    def scalar(self, fmt: str, what: str):
        return struct.unpack_from("<" + fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", f"{what} length")
        start = self.take(n, f"{what} (string of {n} bytes)")
        # surrogateescape: a stray non-UTF-8 byte survives a read/write round trip
        return self.buf[start : start + n].decode("utf-8", "surrogateescape")

    def strings(self, count: int, what: str) -> list[str]:
        """`string` unrolled: vocabularies hold hundreds of thousands of them."""
        buf, pos, out = self.buf, self.pos, []
        for _ in range(count):
            n = struct.unpack_from("<Q", buf, pos)[0] if pos + 8 <= len(buf) else len(buf)
            if pos + 8 + n > len(buf):
                self.pos = pos
                self.string(what)  # raises, naming the problem
            out.append(buf[pos + 8 : pos + 8 + n].decode("utf-8", "surrogateescape"))
            pos += 8 + n
        self.pos = pos
        return out

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype == ValueType.STRING:
            return self.string(what)
        if vtype in _NUMBERS:
            x = np.frombuffer(self.buf, _NUMBERS[vtype], 1, self.take(_MIN_SIZE[vtype], what))
            return bool(x[0]) if vtype == ValueType.BOOL else x[0].item()
        if vtype != ValueType.ARRAY:
            raise ValueError(f"{what}: unknown metadata value type {vtype}")
        if depth >= MAX_NESTING:
            raise ValueError(f"{what}: arrays nested deeper than {MAX_NESTING}")
        etype = self.scalar("I", f"{what} element type")
        count = self.scalar("Q", f"{what} length")
        if etype not in _MIN_SIZE:
            raise ValueError(f"{what}: unknown metadata value type {etype}")
        if count * _MIN_SIZE[etype] > self.left:
            raise ValueError(f"{what}: array length {count} is more than the file could hold")
        if etype in _NUMBERS:
            start = self.take(count * _MIN_SIZE[etype], what)
            x = np.frombuffer(self.buf, _NUMBERS[etype], count, start)
            items = (x != 0 if etype == ValueType.BOOL else x).tolist()
        elif etype == ValueType.STRING:
            items = self.strings(count, what)
        else:
            items = [self.value(etype, what, depth + 1) for _ in range(count)]
        return GGUFValue(items, ValueType(etype))


class GGUFFile:
    """A GGUF file, memory-mapped read-only. `metadata` holds plain Python values (arrays as
    lists), `fields` the same values typed (GGUFValue, ready for write_gguf), `tensors` maps
    names to TensorInfo, in file order."""

    def __init__(self, path):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ValueError(f"{self.path}: empty file, not GGUF")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._bytes = np.frombuffer(self._map, np.uint8)
            self._parse(_Cursor(self._map))
        except BaseException:
            self.close()
            raise

    def _parse(self, cur: _Cursor) -> None:
        if cur.buf[cur.take(4, "magic") : 4] != MAGIC:  # (what it holds instead stays unquoted)
            raise ValueError(f"{self.path}: not a GGUF file (it does not start with {MAGIC!r})")
        self.version = cur.scalar("I", "version")
        if self.version not in (2, 3):
            if self.version & 0xFFFF == 0 and self.version >> 16:
                raise ValueError("big-endian GGUF files are not supported")
            raise ValueError(f"unsupported GGUF version {self.version} (tritlm reads v2 and v3)")
        n_tensors = cur.scalar("Q", "tensor count")
        n_kv = cur.scalar("Q", "metadata count")
        # smallest metadata entry: empty key + type + 1-byte value; smallest tensor info:
        # empty name + n_dims + one dim + type + offset
        if n_kv * 13 + n_tensors * 32 > cur.left:
            raise ValueError(f"header claims {n_tensors} tensors and {n_kv} metadata entries "
                             "(n_tensors / n_kv), more than the file could hold")

        self.fields: dict[str, GGUFValue] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if key in self.fields:
                raise ValueError(f"duplicate metadata key {key!r}")
            vtype = cur.scalar("I", f"type of {key!r}")
            value = cur.value(vtype, f"metadata {key!r}")
            if vtype != ValueType.ARRAY:  # arrays come back typed already
                value = GGUFValue(value, ValueType(vtype))
            self.fields[key] = value
        self.metadata = {k: _plain(v) for k, v in self.fields.items()}
        self.alignment = self._alignment()

        raw = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            n_dims = cur.scalar("I", f"n_dims of {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ValueError(f"tensor {name!r}: n_dims {n_dims} is not in 1..{MAX_DIMS}")
            dims = cur.take(8 * n_dims, f"dims of {name!r}")
            ne = struct.unpack_from(f"<{n_dims}q", cur.buf, dims)  # signed, as ggml reads them
            if min(ne) <= 0:
                raise ValueError(f"tensor {name!r}: dimensions {list(ne)} must be positive")
            type_id = cur.scalar("I", f"type of {name!r}")
            raw.append((name, ne, type_id, cur.scalar("Q", f"offset of {name!r}")))

        self.data_offset = _align(cur.pos, self.alignment)
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, type_id, offset in raw:
            if name in self.tensors:
                raise ValueError(f"duplicate tensor name {name!r}")
            shape = tuple(reversed(ne))
            nbytes = tensor_nbytes(type_id, shape, name)
            if offset % self.alignment:
                raise ValueError(f"tensor {name!r}: offset {offset} is misaligned "
                                 f"(alignment {self.alignment})")
            start = self.data_offset + offset
            if start + nbytes > len(self._bytes):
                raise ValueError(f"tensor {name!r}: data [{start}, {start + nbytes}) runs past the "
                                 f"end of the file ({len(self._bytes)} bytes)")
            type_name = TensorType(type_id).name
            self.tensors[name] = TensorInfo(name, type_id, type_name, shape, start, nbytes)

        end, prev = self.data_offset, None
        for t in sorted(self.tensors.values(), key=lambda t: t.offset):
            if t.offset < end:
                raise ValueError(f"tensor {t.name!r} overlaps tensor {prev!r}")
            end, prev = t.offset + t.nbytes, t.name

    def _alignment(self) -> int:
        value = self.fields.get("general.alignment")
        if value is None:
            return DEFAULT_ALIGNMENT
        a = value.value
        if value.type not in _INT_RANGES or a <= 0 or a & (a - 1):
            raise ValueError(f"general.alignment must be a positive power of two, got {a!r}")
        return a

    @property
    def architecture(self) -> str:
        if "general.architecture" not in self.metadata:
            raise ValueError(f"{self.path}: no general.architecture in the metadata")
        return self.metadata["general.architecture"]

    def tensor_data(self, name: str) -> np.ndarray:
        """The tensor's bytes: a read-only uint8 view of the mapped file."""
        t = self.tensors[name]
        if self._bytes is None:
            raise ValueError(f"{self.path} is closed")
        return self._bytes[t.offset : t.offset + t.nbytes]

    def region(self, name: str) -> FileRegion:
        """Where the tensor's bytes lie, to read them later (after the file is closed)."""
        t = self.tensors[name]
        return FileRegion(self.path, t.offset, t.nbytes)

    def tensor_array(self, name: str) -> np.ndarray:
        """The tensor as float32 in its NumPy shape (F32 is a view; the others are decoded)."""
        t, data = self.tensors[name], self.tensor_data(name)
        if t.type == TensorType.F32:
            return data.view("<f4").reshape(t.shape)
        if t.type == TensorType.F16:
            return blocks.f16_to_f32(data).reshape(t.shape)
        if t.type == TensorType.BF16:
            return blocks.bf16_to_f32(data).reshape(t.shape)
        if t.type == TensorType.Q8_0:
            return blocks.dequantize_q8_0(data, t.shape)
        if t.type == TensorType.Q6_K:
            return blocks.dequantize_q6_k(data, t.shape)
        raise ValueError(f"tensor {name!r} is {t.type_name}, a ternary layout: unpack its "
                         f"tensor_data with tritlm.quant.layouts.FILE_LAYOUTS[{t.type_name!r}]")

    def close(self) -> None:
        self._bytes = None
        close_map(self._map)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"GGUFFile({self.path!r}, v{self.version}, {len(self.metadata)} keys, "
                f"{len(self.tensors)} tensors)")


# ------------------------------------------------------------------------------------ writer

_DTYPE_TYPES = {np.dtype(d).str[1:]: t for t, d in _NUMBERS.items() if t != ValueType.BOOL}


def _int_type(lo: int, hi: int) -> ValueType:
    """The integer rule: uint32 when it fits (llama.cpp wants uint32 for counts, lengths and
    token ids), else int32, int64, uint64."""
    for t in (ValueType.UINT32, ValueType.INT32, ValueType.INT64, ValueType.UINT64):
        if _INT_RANGES[t][0] <= lo and hi <= _INT_RANGES[t][1]:
            return t
    raise ValueError(f"integer {hi if hi > 0 else lo} does not fit 64 bits")


def _is_array(value) -> bool:
    value = value.value if isinstance(value, GGUFValue) else value
    return isinstance(value, (list, tuple)) or isinstance(value, np.ndarray) and value.ndim > 0


def _infer(value, what: str) -> GGUFValue:
    """Type a Python value: bool -> BOOL, int -> the integer rule, float -> FLOAT32, str ->
    STRING, NumPy scalars and arrays by dtype, lists by their items."""
    if isinstance(value, GGUFValue):
        return value
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype.str[1:] in _DTYPE_TYPES:
        vtype = _DTYPE_TYPES[value.dtype.str[1:]]
        if value.ndim <= 1:
            return GGUFValue(value if value.ndim else value.item(), vtype)
    if isinstance(value, np.ndarray):
        return _infer(value.tolist(), what)
    if isinstance(value, (bool, np.bool_)):
        return GGUFValue(bool(value), ValueType.BOOL)
    if isinstance(value, int):
        return GGUFValue(value, _int_type(value, value))
    if isinstance(value, float):
        return GGUFValue(value, ValueType.FLOAT32)
    if isinstance(value, str):
        return GGUFValue(value, ValueType.STRING)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{what}: an empty array needs its element type: GGUFValue([], type)")
        if all(isinstance(x, str) for x in value):  # the common case, and a vocabulary is long
            return GGUFValue(value, ValueType.STRING)
        if all(_is_array(x) for x in value):
            return GGUFValue(list(value), ValueType.ARRAY)
        types = {_infer(x, what).type for x in value}
        if len(types) == 1:
            return GGUFValue(value, types.pop())
        if types <= set(_INT_RANGES):  # mixed signs or sizes: the rule over the whole range
            return GGUFValue(value, _int_type(min(value), max(value)))
        if types <= {ValueType.FLOAT32, *_INT_RANGES}:
            return GGUFValue(value, ValueType.FLOAT32)
    raise ValueError(f"{what}: cannot store {type(value).__name__} {value!r:.60} in GGUF")


def _encode_string(s: str) -> bytes:
    b = s.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(b)) + b


def _encode_numbers(items, vtype: ValueType, what: str) -> bytes:
    a = np.asarray(items)
    if vtype in _INT_RANGES:
        lo, hi = _INT_RANGES[vtype]
        # Python ints beyond int64 make an object array
        if a.size and a.dtype.kind not in "iub" and not all(isinstance(x, int) for x in a.flat):
            raise ValueError(f"{what}: {vtype.name} needs integers, got {a.dtype}")
        if a.size and (a.min() < lo or a.max() > hi):
            raise ValueError(f"{what}: value out of the {vtype.name} range")
    return (a != 0 if vtype == ValueType.BOOL else a).astype(_NUMBERS[vtype]).tobytes()


def _encode_value(value: GGUFValue, what: str, depth: int = 0) -> bytes:
    """The value without its type tag."""
    v, vtype = value.value, ValueType(value.type)
    if depth > MAX_NESTING:
        raise ValueError(f"{what}: arrays nested deeper than {MAX_NESTING}")
    array = _is_array(v)
    items = v if array else [v]
    if vtype == ValueType.STRING:
        if not all(isinstance(x, str) for x in items):
            raise ValueError(f"{what}: STRING needs str values")
        body = b"".join(map(_encode_string, items))
    elif vtype == ValueType.ARRAY:
        if not array or not all(_is_array(x) for x in items):
            raise ValueError(f"{what}: an array of arrays needs a list of arrays")
        # each element is an array written without a type tag: element type, count, items
        body = b"".join(_encode_value(_infer(x, what), what, depth + 1) for x in items)
    elif vtype in _NUMBERS:
        body = _encode_numbers(items, vtype, what)
    else:
        raise ValueError(f"{what}: unknown metadata value type {vtype}")
    return struct.pack("<IQ", vtype, len(items)) + body if array else body


def _encode_kv(key: str, value) -> bytes:
    typed = _infer(value, f"metadata {key!r}")
    tag = ValueType.ARRAY if _is_array(typed.value) else typed.type
    return _encode_string(key) + struct.pack("<I", tag) + _encode_value(typed, f"metadata {key!r}")


class GGUFWriter:
    """Streams a GGUF v3 file, one tensor in memory at a time:

        with GGUFWriter(path, metadata) as w:
            for name, type_id, shape in infos:
                w.add_tensor_info(name, type_id, shape)      # NumPy shape
            for name, data in ...:                           # same order
                w.write_tensor_data(name, data)

    The header goes out with the first tensor's data (or at close). Metadata values are typed
    by `_infer` (bool -> BOOL; int -> UINT32 if it fits, else INT32, INT64, UINT64; float ->
    FLOAT32; str -> STRING; NumPy scalars and 1-D arrays by dtype; lists by their items), or
    explicitly with GGUFValue. `alignment`, if not the default, is also written as
    `general.alignment`.
    """

    def __init__(self, path, metadata: dict | None = None, alignment: int | None = None, *,
                 drop_behind: bool = False):
        """drop_behind: every DROP_EVERY bytes, write the data out and drop it from the page
        cache (Linux), so that writing a file larger than memory leaves the cache as it was."""
        self.metadata = dict(metadata or {})
        self._drop_behind, self._dropped = drop_behind and hasattr(os, "posix_fadvise"), 0
        if "general.alignment" in self.metadata:
            given = _plain(_infer(self.metadata["general.alignment"], "general.alignment"))
            if alignment not in (None, given):
                raise ValueError(f"alignment {alignment} contradicts general.alignment {given}")
            alignment = given
        elif alignment not in (None, DEFAULT_ALIGNMENT):
            self.metadata["general.alignment"] = GGUFValue(alignment, ValueType.UINT32)
        a = self.alignment = DEFAULT_ALIGNMENT if alignment is None else alignment
        if not isinstance(a, int) or a <= 0 or a & (a - 1):
            raise ValueError(f"alignment must be a positive power of two, got {a!r}")
        # encoded now, so that a value that cannot be stored fails before anything is written
        self._kv = b"".join(_encode_kv(key, value) for key, value in self.metadata.items())
        self._tensors: dict[str, tuple] = {}  # name -> (type, shape, nbytes, relative offset)
        self._names: list[str] = []
        self._size = 0  # data section so far
        self._written = 0  # tensors whose data is written
        self._file = open(path, "wb")

    def add_tensor_info(self, name: str, type_id: int, shape) -> None:
        if self._written or self._file.tell():
            raise ValueError("add every tensor's info before writing any tensor data")
        shape = tuple(int(d) for d in shape)
        if name in self._tensors:
            raise ValueError(f"duplicate tensor name {name!r}")
        if not 1 <= len(shape) <= MAX_DIMS or min(shape) <= 0:
            raise ValueError(f"tensor {name!r}: shape {shape} needs 1..{MAX_DIMS} positive dims")
        nbytes = tensor_nbytes(type_id, shape, name)
        self._tensors[name] = (int(type_id), shape, nbytes, self._size)
        self._names.append(name)
        self._size += _align(nbytes, self.alignment)

    def _write_header(self) -> None:
        out = bytearray(MAGIC + struct.pack("<IQQ", VERSION, len(self._names), len(self.metadata)))
        out += self._kv
        for name, (type_id, shape, _, offset) in self._tensors.items():
            out += _encode_string(name)
            out += struct.pack(f"<I{len(shape)}QIQ", len(shape), *reversed(shape), type_id, offset)
        out += bytes(_align(len(out), self.alignment) - len(out))
        self._file.write(out)

    def write_tensor_data(self, name: str, data) -> None:
        """`data`: the tensor's bytes as bytes-like or a contiguous ndarray of any dtype."""
        names, i = self._names, self._written
        if i >= len(names) or names[i] != name:
            expected = repr(names[i]) if i < len(names) else "no more tensors"
            raise ValueError(f"tensor data out of order: got {name!r}, expected {expected}")
        if not self._file.tell():
            self._write_header()
        _, _, nbytes, _ = self._tensors[name]
        if isinstance(data, np.ndarray):
            buf = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        else:
            buf = np.frombuffer(data, np.uint8)
        if buf.size != nbytes:
            raise ValueError(f"tensor {name!r}: {buf.size} bytes of data, its type and shape "
                             f"need {nbytes}")
        self._file.write(buf.data)
        self._file.write(bytes(_align(nbytes, self.alignment) - nbytes))
        self._written += 1
        if self._drop_behind and self._file.tell() - self._dropped >= self.DROP_EVERY:
            self._drop()

    DROP_EVERY = 256 << 20

    def _drop(self) -> None:
        self._file.flush()
        os.fdatasync(self._file.fileno())  # (dirty pages cannot be dropped)
        end = self._file.tell()
        os.posix_fadvise(self._file.fileno(), self._dropped, end - self._dropped, os.POSIX_FADV_DONTNEED)
        self._dropped = end

    def close(self) -> None:
        """Finish the file; complains if a declared tensor got no data."""
        if self._file is None or self._file.closed:
            return
        try:
            if not self._file.tell():
                self._write_header()
            if self._written < len(self._names):
                raise ValueError(f"tensor {self._names[self._written]!r} has no data")
            if self._drop_behind:
                self._drop()
        finally:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        elif self._file is not None:
            self._file.close()  # an error is on its way out: leave the partial file as it is


def write_gguf(path, metadata: dict, tensors, alignment: int | None = None) -> None:
    """Write a GGUF file. `tensors`: iterable of (name, type_id, numpy_shape, data), where data
    is the bytes (see GGUFWriter.write_tensor_data) or a callable returning them, called only
    when that tensor is written: pass callables to stream tensors larger than memory."""
    tensors = list(tensors)
    with GGUFWriter(path, metadata, alignment) as w:
        for name, type_id, shape, _ in tensors:
            w.add_tensor_info(name, type_id, shape)
        for name, _, _, data in tensors:
            w.write_tensor_data(name, data() if callable(data) else data)
