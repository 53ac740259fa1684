"""formats/gguf.py against the `gguf` package (both directions), against byte offsets worked out
by hand from the spec (I2_S, which the package cannot read), and against malformed files."""

import struct

import gguf
import numpy as np
import pytest
from conftest import random_ternary
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from gguf import quants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tritlm.formats import GGUFFile, GGUFValue, GGUFWriter, TensorType, ValueType, write_gguf
from tritlm.quant import layouts

# key -> (value, type) for every scalar type, and an array of each
SCALARS = {
    "t.u8": (200, V.UINT8), "t.i8": (-100, V.INT8), "t.u16": (60000, V.UINT16),
    "t.i16": (-30000, V.INT16), "t.u32": (4_000_000_000, V.UINT32),
    "t.i32": (-2_000_000_000, V.INT32),
    "t.f32": (0.1, V.FLOAT32), "t.u64": (2**63 + 5, V.UINT64), "t.i64": (-(2**40) - 7, V.INT64),
    "t.f64": (0.1, V.FLOAT64), "t.bool": (True, V.BOOL), "t.str": ("héllo ✓ \u2581", V.STRING),
}
ARRAYS = {f"{k}.arr": ([v, v] if t != V.STRING else [v, "", "b"], t)
          for k, (v, t) in SCALARS.items()}


def as_stored(value, vtype):
    """What a value reads back as: floats pass through float32 when stored as such."""
    if isinstance(value, list):
        return [as_stored(v, vtype) for v in value]
    return float(np.float32(value)) if vtype == V.FLOAT32 else value


def sample_tensors(rng):
    """name -> (gguf type, NumPy shape, bytes as uint8 (rows, row bytes))"""
    x = rng.standard_normal((4, 512)).astype(np.float32)
    ternary = random_ternary(rng, 4, 512).astype(np.float32) * np.float32(0.25)
    q6 = rng.integers(0, 256, (8, 210), dtype=np.uint8)
    q6[:, 208:] = (rng.standard_normal((8, 1)) * 0.01).astype(np.float16).view(np.uint8)
    f32_3d = rng.standard_normal((2, 3, 8)).astype(np.float32)
    return {
        "norm.weight": (Q.F32, (5,), rng.standard_normal(5).astype(np.float32).view(np.uint8)),
        "f32_3d": (Q.F32, (2, 3, 8), f32_3d.view(np.uint8)),
        "token_embd.weight": (Q.F16, (4, 512), x.astype(np.float16).view(np.uint8)),
        "bf16": (Q.BF16, (4, 512), quants.quantize(x, Q.BF16)),
        "q8_0": (Q.Q8_0, (4, 512), quants.quantize(x, Q.Q8_0)),
        "q6_k": (Q.Q6_K, (4, 512), q6.reshape(4, -1)),
        "tq1_0": (Q.TQ1_0, (4, 512), quants.quantize(ternary, Q.TQ1_0)),
        "tq2_0": (Q.TQ2_0, (4, 512), quants.quantize(ternary, Q.TQ2_0)),
    }


def write_with_gguf_package(path, tensors, alignment=64, endianess=gguf.GGUFEndian.LITTLE):
    w = gguf.GGUFWriter(path, "bitnet-b1.58", endianess=endianess)
    w.add_custom_alignment(alignment)
    for key, (value, vtype) in SCALARS.items():
        w.add_key_value(key, value, vtype)
    for key, (value, vtype) in ARRAYS.items():
        w.add_key_value(key, value, V.ARRAY, sub_type=vtype)
    w.add_array("t.nested", [[1, 2], [3, 4, 5]])
    for name, (qtype, _, data) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_reads_files_written_by_gguf_package(tmp_path, rng):
    path = tmp_path / "theirs.gguf"
    tensors = sample_tensors(rng)
    write_with_gguf_package(path, tensors)
    theirs = gguf.GGUFReader(path)
    with GGUFFile(path) as f:
        assert f.version == 3 and f.alignment == 64 and f.architecture == "bitnet-b1.58"
        assert list(f.metadata) == [k for k in theirs.fields if not k.startswith("GGUF.")]
        for key, (value, vtype) in {**SCALARS, **ARRAYS}.items():
            assert f.metadata[key] == as_stored(value, vtype), key
            assert f.fields[key].type == vtype
        assert f.metadata["t.nested"] == [[1, 2], [3, 4, 5]]
        assert f.fields["t.nested"].type == ValueType.ARRAY

        assert list(f.tensors) == [t.name for t in theirs.tensors]
        for t in theirs.tensors:
            info, (qtype, shape, data) = f.tensors[t.name], tensors[t.name]
            assert (info.type, info.type_name, info.shape) == (qtype, qtype.name, shape)
            assert info.shape == tuple(reversed(t.shape.tolist()))
            assert (info.offset, info.nbytes) == (t.data_offset, t.n_bytes)
            assert info.offset % 64 == 0
            raw = f.tensor_data(t.name)
            assert raw.dtype == np.uint8 and not raw.flags.writeable
            np.testing.assert_array_equal(raw, data.reshape(-1))
            if qtype in (Q.TQ1_0, Q.TQ2_0):
                with pytest.raises(ValueError, match="ternary layout.*FILE_LAYOUTS"):
                    f.tensor_array(t.name)
                ternary, scale = layouts.FILE_LAYOUTS[qtype.name][1](raw, shape)
                np.testing.assert_array_equal(ternary * scale[:, None],
                                              quants.dequantize(data, qtype).reshape(shape))
            else:
                got = f.tensor_array(t.name)
                assert got.dtype == np.float32 and got.shape == shape
                want = quants.dequantize(data, qtype).reshape(shape)
                np.testing.assert_array_equal(got, want)


def test_rewriting_a_gguf_package_file_gives_the_same_bytes(tmp_path, rng):
    """Our writer, given what our reader read (typed fields), reproduces their file exactly."""
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    write_with_gguf_package(theirs, sample_tensors(rng))
    with GGUFFile(theirs) as f:
        write_gguf(ours, f.fields, [(t.name, t.type, t.shape, lambda t=t: f.tensor_data(t.name))
                                    for t in f.tensors.values()])
    assert ours.read_bytes() == theirs.read_bytes()


def test_gguf_package_reads_files_we_write(tmp_path, rng):
    path = tmp_path / "ours.gguf"
    tensors = sample_tensors(rng)
    tokens = ["<s>", "▁hé", "llo", "\n"]
    metadata = {
        "general.architecture": "bitnet",
        "bitnet.context_length": 4096,  # int -> uint32, as llama.cpp wants
        "bitnet.rope.freq_base": 500000.0,  # float -> float32
        "bitnet.attention.layer_norm_rms_epsilon": 1e-5,
        "t.negative": -3,  # -> int32
        "t.big": 2**40,  # -> int64
        "t.flag": False,
        "t.typed": GGUFValue(7, ValueType.UINT8),
        "t.typed_f64": GGUFValue(0.1, ValueType.FLOAT64),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.linspace(-1, 0, 4, dtype=np.float32),
        "tokenizer.ggml.token_type": np.array([3, 1, 1, 6], np.int32),
        "t.ints": [1, -2, 3],
        "t.nested": [["a", "b"], ["c"]],
        "t.empty": GGUFValue([], ValueType.INT32),
    }
    write_gguf(path, metadata, [(n, q, s, d) for n, (q, s, d) in tensors.items()], alignment=16)
    r = gguf.GGUFReader(path)
    expect = {
        "general.architecture": ([V.STRING], "bitnet"),
        "general.alignment": ([V.UINT32], 16),
        "bitnet.context_length": ([V.UINT32], 4096),
        "bitnet.rope.freq_base": ([V.FLOAT32], 500000.0),
        "bitnet.attention.layer_norm_rms_epsilon": ([V.FLOAT32], float(np.float32(1e-5))),
        "t.negative": ([V.INT32], -3), "t.big": ([V.INT64], 2**40), "t.flag": ([V.BOOL], False),
        "t.typed": ([V.UINT8], 7), "t.typed_f64": ([V.FLOAT64], 0.1),
        "tokenizer.ggml.tokens": ([V.ARRAY, V.STRING], tokens),
        "tokenizer.ggml.scores": ([V.ARRAY, V.FLOAT32], metadata["tokenizer.ggml.scores"].tolist()),
        "tokenizer.ggml.token_type": ([V.ARRAY, V.INT32], [3, 1, 1, 6]),
        "t.ints": ([V.ARRAY, V.INT32], [1, -2, 3]),
    }
    for key, (types, value) in expect.items():
        assert (r.fields[key].types, r.fields[key].contents()) == (types, value), key
    assert r.fields["t.nested"].types[:2] == [V.ARRAY, V.ARRAY]
    assert r.fields["t.empty"].types == [V.ARRAY] and len(r.fields["t.empty"].data) == 0
    assert [t.name for t in r.tensors] == list(tensors)
    for t in r.tensors:
        qtype, shape, data = tensors[t.name]
        assert t.tensor_type == qtype and tuple(reversed(t.shape.tolist())) == shape
        assert t.data_offset % 16 == 0
        np.testing.assert_array_equal(t.data.reshape(-1).view(np.uint8), data.reshape(-1))


def test_round_trip_of_typed_metadata(tmp_path):
    fields = {
        "general.architecture": GGUFValue("bitnet", ValueType.STRING),
        "a": GGUFValue([1, 2], ValueType.UINT64), "b": GGUFValue(-1.5, ValueType.FLOAT64),
        "c": GGUFValue([GGUFValue([True], ValueType.BOOL), GGUFValue([], ValueType.INT8)],
                       ValueType.ARRAY),
        "d": GGUFValue("bad \udcff byte", ValueType.STRING),  # invalid UTF-8 survives
    }
    write_gguf(tmp_path / "a.gguf", fields, [])
    with GGUFFile(tmp_path / "a.gguf") as f:
        assert f.fields == fields and f.tensors == {}
        assert f.metadata["c"] == [[True], []]


# ---------------------------------------------------------------------------------------- I2_S

def test_i2s_offsets_and_bytes_by_hand(tmp_path, rng):
    ternary = random_ternary(rng, 8, 256)
    packed = layouts.pack_i2s(ternary, np.float32(0.75))
    a, b = np.arange(3, dtype=np.float32), np.arange(5, dtype=np.float32)
    path = tmp_path / "i2s.gguf"
    with GGUFWriter(path, {"general.architecture": "bitnet"}, alignment=64) as w:
        w.add_tensor_info("a", TensorType.F32, (3,))
        w.add_tensor_info("w", TensorType.I2_S, (8, 256))
        w.add_tensor_info("b", TensorType.F32, (5,))
        w.write_tensor_data("a", a)
        w.write_tensor_data("w", packed)
        w.write_tensor_data("b", b)
    # header: 24 fixed; kv: 8+20 key, 4 type, 8+6 value; general.alignment: 8+17 key, 4, 4 value;
    # infos: 8+len(name), 4 n_dims, 8 per dim, 4 type, 8 offset
    header = (24 + (28 + 4 + 14) + (25 + 4 + 4)
              + (9 + 4 + 8 + 12) + (9 + 4 + 16 + 12) + (9 + 4 + 8 + 12))
    data_start = -(-header // 64) * 64
    i2s_bytes = 8 * 256 // 4 + 32
    raw = path.read_bytes()
    w_info = 24 + 46 + 33 + 33 + 9  # after the name of "w"
    assert struct.unpack_from("<I2QIQ", raw, w_info) == (2, 256, 8, 36, 64)
    assert raw[data_start + 64 : data_start + 64 + i2s_bytes] == packed.tobytes()
    assert raw[data_start + 64 + 512 : data_start + 64 + 516] == np.float32(0.75).tobytes()
    assert len(raw) == data_start + 64 + 576 + 64
    with GGUFFile(path) as f:
        assert f.data_offset == data_start
        assert [(t.offset, t.nbytes) for t in f.tensors.values()] == [
            (data_start, 12), (data_start + 64, i2s_bytes), (data_start + 64 + 576, 20)]
        np.testing.assert_array_equal(f.tensor_data("w"), packed)
        back, scale = layouts.unpack_i2s(f.tensor_data("w"), f.tensors["w"].shape)
        np.testing.assert_array_equal(back, ternary)
        np.testing.assert_array_equal(f.tensor_array("b"), b)
        with pytest.raises(ValueError, match="I2_S, a ternary layout"):
            f.tensor_array("w")


# ------------------------------------------------------------------------------- bad files

def string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def kv_u32(key: bytes, value: int) -> bytes:
    return string(key) + struct.pack("<II", 4, value)


def info(name: bytes, ne, type_id=0, offset=0) -> bytes:
    return string(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, type_id, offset)


def gguf_bytes(kvs=(), infos=(), data=b"", version=3, n_kv=None, n_tensors=None) -> bytes:
    """A GGUF file assembled by hand from raw entries (no alignment key: 32)."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % 32) + data


def open_bytes(tmp_path, raw: bytes):
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw)
    with GGUFFile(path) as f:
        return f


def test_hand_made_file_is_valid(tmp_path):
    f = open_bytes(tmp_path, gguf_bytes([kv_u32(b"k", 1)], [info(b"x", [8, 2])], bytes(64)))
    assert f.metadata == {"k": 1} and f.tensors["x"].shape == (2, 8)


def kv_array(etype: int, count: int, rest=b"") -> bytes:
    """Key "k" holding an array header (element type, count) followed by `rest`."""
    return string(b"k") + struct.pack("<IIQ", 9, etype, count) + rest


def with_tensors(*infos, data=0) -> bytes:
    return gguf_bytes(infos=list(infos), data=bytes(data))


BAD_FILES = {
    "not a GGUF file": b"GGUX" + bytes(60),
    "empty file": b"",
    "version 1": gguf_bytes(version=1),
    "version 7": gguf_bytes(version=7),
    "big-endian": b"GGUF" + struct.pack(">IQQ", 3, 0, 0),
    "more than the file could hold": gguf_bytes(n_tensors=2**62),
    "n_kv": gguf_bytes(n_kv=2**40),
    "string of 4611686018427387904 bytes": gguf_bytes([struct.pack("<Q", 2**62) + b"k"]),
    "array length 1152921504606846976": gguf_bytes([kv_array(5, 2**60)]),
    "'k': array length 1099511627776": gguf_bytes([kv_array(8, 2**40)]),  # strings
    "unknown metadata value type 13": gguf_bytes([string(b"k") + struct.pack("<I", 13) + bytes(8)]),
    "nested deeper": gguf_bytes([kv_array(9, 1, struct.pack("<IQ", 9, 1) * 12 + bytes(12))]),
    "duplicate metadata key 'k'": gguf_bytes([kv_u32(b"k", 1), kv_u32(b"k", 2)]),
    "duplicate tensor name 'x'": with_tensors(info(b"x", [8]), info(b"x", [8], offset=32), data=64),
    "'x'.*runs past the end": with_tensors(info(b"x", [8, 2]), data=63),
    "'y'.*runs past the end": with_tensors(info(b"x", [8]), info(b"y", [8], offset=2**63), data=32),
    "'y' overlaps tensor 'x'": with_tensors(info(b"x", [16]), info(b"y", [8], offset=32), data=96),
    "overlaps tensor": with_tensors(info(b"x", [8]), info(b"y", [8]), data=32),
    "offset 8 is misaligned": with_tensors(info(b"x", [8], offset=8), data=64),
    "n_dims 5": with_tensors(info(b"x", [1, 1, 1, 1, 1]), data=32),
    "n_dims 0": with_tensors(info(b"x", []), data=32),
    "dimensions \\[8, 0\\] must be positive": with_tensors(info(b"x", [8, 0])),
    "must be positive": with_tensors(info(b"x", [2**64 - 8])),  # -8 as ggml's int64
    "'x': unsupported tensor type id 99": with_tensors(info(b"x", [8], 99), data=32),
    "type 38 \\(TL1.*not supported.*I2_S": with_tensors(info(b"x", [8], 38), data=32),
    "type 39 \\(TL2.*not supported.*I2_S": with_tensors(info(b"x", [8], 39), data=32),
    "type 42 \\(TL2.*not supported.*I2_S": with_tensors(info(b"x", [8], 42), data=32),
    "Q8_0 needs the row length to be a multiple of 32": with_tensors(info(b"x", [48, 2], 8), data=128),
    "I2_S needs a multiple of 128": with_tensors(info(b"x", [64], 36), data=64),
    "alignment must be a positive power of two": gguf_bytes([kv_u32(b"general.alignment", 24)]),
    "power of two, got 0": gguf_bytes([kv_u32(b"general.alignment", 0)]),
}


@pytest.mark.parametrize("problem", list(BAD_FILES))
def test_bad_files_name_the_problem(tmp_path, problem):
    with pytest.raises(ValueError, match=problem):
        open_bytes(tmp_path, BAD_FILES[problem])


def test_big_endian_file_from_gguf_package(tmp_path, rng):
    path = tmp_path / "be.gguf"
    write_with_gguf_package(path, {}, endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(ValueError, match="big-endian"):
        GGUFFile(path)


def test_v2_reads_like_v3(tmp_path):
    f = open_bytes(tmp_path, gguf_bytes([kv_u32(b"k", 1)], [info(b"x", [8])], bytes(32), version=2))
    assert f.version == 2 and f.metadata == {"k": 1} and f.tensors["x"].nbytes == 32


def small_file(path, rng):
    metadata = {"general.architecture": "bitnet", "n": 3, "s": ["ab", "c"], "z": [[1.5], [2.5]]}
    tensors = [("f", TensorType.F32, (2, 4), rng.standard_normal(8).astype(np.float32)),
               ("q", TensorType.Q8_0, (1, 32), np.full(34, 60, np.uint8)),
               ("k", TensorType.Q6_K, (1, 256), np.full(210, 1, np.uint8)),
               ("t", TensorType.TQ2_0, (1, 256), np.full(66, 0x55, np.uint8)),
               ("i", TensorType.I2_S, (1, 128), np.full(64, 0x55, np.uint8))]
    write_gguf(path, metadata, tensors, alignment=8)
    return path.read_bytes()


def test_every_truncation_is_an_error(tmp_path, rng):
    raw = small_file(tmp_path / "ok.gguf", rng)
    for n in range(len(raw)):
        with pytest.raises(ValueError, match="truncated|past the end|more than the file|empty"):
            open_bytes(tmp_path, raw[:n])


def test_writer_errors(tmp_path):
    path = tmp_path / "w.gguf"
    with GGUFWriter(path) as w:
        w.add_tensor_info("a", TensorType.F32, (4,))
        with pytest.raises(ValueError, match="duplicate tensor name 'a'"):
            w.add_tensor_info("a", TensorType.F32, (4,))
        with pytest.raises(ValueError, match="TL1.*not supported"):
            w.add_tensor_info("b", 38, (4,))
        with pytest.raises(ValueError, match="'c'.*multiple of 256"):
            w.add_tensor_info("c", TensorType.TQ2_0, (2, 128))
        w.add_tensor_info("d", TensorType.F16, (4,))
        with pytest.raises(ValueError, match="out of order: got 'd', expected 'a'"):
            w.write_tensor_data("d", bytes(8))
        with pytest.raises(ValueError, match="'a': 12 bytes of data, its type and shape need 16"):
            w.write_tensor_data("a", bytes(12))
        w.write_tensor_data("a", np.zeros(4, np.float32))
        with pytest.raises(ValueError, match="before writing any tensor data"):
            w.add_tensor_info("e", TensorType.F32, (4,))
        with pytest.raises(ValueError, match="tensor 'd' has no data"):
            w.close()
    for value, problem in [(GGUFValue(300, ValueType.UINT8), "out of the UINT8 range"),
                           ([], "empty array needs its element type"),
                           (GGUFValue(1.5, ValueType.INT32), "INT32 needs integers"),
                           ({"a": 1}, "cannot store dict"), (2**64, "does not fit 64 bits")]:
        with pytest.raises(ValueError, match=problem):
            write_gguf(path, {"k": value}, [])
    with pytest.raises(ValueError, match="contradicts general.alignment"):
        GGUFWriter(path, {"general.alignment": 64}, alignment=16)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_corrupt_files_give_only_value_errors(tmp_path, data):
    raw = bytearray(small_file(tmp_path / "ok.gguf", np.random.default_rng(0)))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    for _ in range(data.draw(st.integers(1, 4))):
        if raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]) | st.integers(0, 255))
    try:
        open_bytes(tmp_path, bytes(raw))
    except ValueError:
        return
    with GGUFFile(tmp_path / "bad.gguf") as f, np.errstate(all="ignore"):
        for name, t in f.tensors.items():
            assert f.tensor_data(name).size == t.nbytes
            try:
                f.tensor_array(name)
            except ValueError as e:
                assert "ternary" in str(e)
