"""formats/safetensors.py and formats/hf.py: what they read against the safetensors package, and
malformed or hostile files and directories (each a ValueError naming the problem)."""

import json
import os
import shutil
import struct

import numpy as np
import pytest
import safetensors.numpy
from fuzzing import write_hf

from tritlm import LLM
from tritlm.formats.gguf import GGUFFile
from tritlm.formats.hf import HFCheckpoint
from tritlm.formats.safetensors import SafetensorsFile
from tritlm.models import loader

INDEX = "model.safetensors.index.json"
SHARD = "model-00001-of-00002.safetensors"


def header_file(path, header, data=b"") -> str:
    """A safetensors file with this header (a JSON value, or bytes as they are) and data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)
    return str(path)


def test_reads_what_the_safetensors_package_writes(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"f32": rng.standard_normal((3, 5)).astype(np.float32), "u8": np.arange(12, dtype=np.uint8),
              "i64": np.array([-(2**40), 7]), "empty": np.zeros((0, 4), np.float16)}
    safetensors.numpy.save_file(arrays, tmp_path / "a.safetensors")
    with SafetensorsFile(tmp_path / "a.safetensors") as f:
        assert set(f.tensors) == set(arrays)
        for name, a in arrays.items():
            np.testing.assert_array_equal(f.raw(name), a)
            assert f.raw(name).dtype == a.dtype and f.raw(name).shape == a.shape


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


BAD_HEADERS = [  # (problem, header, data bytes)
    ("unsupported dtype 'Q4'", {"x": entry(dtype="Q4")}, 8),
    ("unsupported dtype \\[1, 'a'\\]", {"x": entry(dtype=[1, "a"])}, 8),
    ("unsupported dtype None", {"x": {"shape": [2], "data_offsets": [0, 8]}}, 8),
    ("header entry is not a JSON object", {"x": [1, 2]}, 8),
    ("shape must be a list of integers in \\[0, 2\\*\\*63\\)", {"x": entry(shape=(-1,))}, 8),
    ("shape must be", {"x": entry(shape=(2.0,))}, 8),
    ("shape must be", {"x": entry(shape=(True, 2))}, 8),
    ("shape must be", {"x": entry(shape="2")}, 8),
    ("shape must be", {"x": entry(shape=(2**63, 0), offsets=(0, 0))}, 0),  # NumPy's limit
    ("shape must be", {"x": entry(shape=(10**30,))}, 8),
    ("data_offsets must be two integers \\[begin, end\\]", {"x": entry(offsets=(0,))}, 8),
    ("data_offsets must be", {"x": entry(offsets=(8, 0))}, 8),
    ("data_offsets must be", {"x": entry(offsets=(-8, 0))}, 8),
    ("data_offsets must be", {"x": entry(offsets=("0", "8"))}, 8),
    ("declares 4 bytes, its shape \\[2\\] and dtype F32 need 8", {"x": entry(offsets=(0, 4))}, 8),
    # 2**32 * 2**32 wraps around to 0 in int64: it must not pass for an empty tensor
    ("declares 0 bytes.*need 73786976294838206464", {"x": entry(shape=(2**32, 2**32), offsets=(0, 0))}, 0),
    ("'x' runs past the end of the file", {"x": entry(offsets=(2**64, 2**64 + 8))}, 8),
    ("'x' runs past the end", {"x": entry()}, 7),
    ("the header is not a JSON object", [], 0),
    ("__metadata__ is not a JSON object", {"__metadata__": "x"}, 0),
    ("header is not valid JSON: Expecting", b"{", 0),
    ("header is not valid JSON: not UTF-8 at byte 2", b'{"\xff": 1}', 0),
    ("header is not valid JSON for tritlm: nested too deeply", b"[" * 100_000 + b"]" * 100_000, 0),
]


@pytest.mark.parametrize("problem, header, data", BAD_HEADERS, ids=range(len(BAD_HEADERS)))
def test_bad_headers_name_the_problem(tmp_path, problem, header, data):
    with pytest.raises(ValueError, match=problem):
        SafetensorsFile(header_file(tmp_path / "bad.safetensors", header, bytes(data)))


def test_header_length_beyond_the_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 100) + b"{}")
    with pytest.raises(ValueError, match="header length does not fit the file \\(10 bytes\\)"):
        SafetensorsFile(path)


def test_messages_do_not_quote_the_file(tmp_path):
    """Whatever file a model path leads to, its bytes stay out of the error message."""
    text = b"root:x:0:0:root:/root:/bin/bash\n"
    (tmp_path / "passwd").write_bytes(text)
    header_file(tmp_path / "utf8.safetensors", b'{"root:\xff": 1}')
    leaks = [str(int.from_bytes(text[:8], "little")), "root", "xff"]
    for path, reader in [(tmp_path / "passwd", SafetensorsFile), (tmp_path / "passwd", GGUFFile),
                         (tmp_path / "utf8.safetensors", SafetensorsFile)]:
        with pytest.raises(ValueError) as e:
            reader(path)
        assert str(tmp_path) in str(e.value)
        message = str(e.value).replace(str(tmp_path), "")
        assert not [leak for leak in leaks if leak in message], message


def test_arrays_outlive_close_and_close_never_raises(tmp_path):
    path = header_file(tmp_path / "a.safetensors", {"x": entry()}, np.array([1.5, 2.5], np.float32).tobytes())
    f = SafetensorsFile(path)
    x = f.raw("x")
    f.close()  # with an array still viewing the file's memory map
    f.close()
    np.testing.assert_array_equal(x, [1.5, 2.5])
    with pytest.raises(ValueError, match="is closed"):
        f.raw("x")
    with pytest.raises(KeyError, match="the error on its way out"):
        with SafetensorsFile(path) as f:
            x = f.raw("x")
            raise KeyError("the error on its way out")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A packed single-file checkpoint and a bf16 one in two shards."""
    base = tmp_path_factory.mktemp("hf")
    write_hf(base / "single", packed=True, shards=1)
    write_hf(base / "sharded", packed=False, shards=2)
    return base


def copy(hf_dirs, name, tmp_path) -> str:
    return shutil.copytree(hf_dirs / name, tmp_path / name, symlinks=True)


def rewrite_header(path, change):
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    header_file(path, header, raw[8 + n:])


def test_loader_error_is_not_masked_by_closing(hf_dirs, tmp_path):
    """A packed weight reshaped (same bytes, so the file is consistent): the loader's ValueError
    comes out, not a BufferError from closing the file while its array is alive."""
    d = copy(hf_dirs, "single", tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    rewrite_header(os.path.join(d, "model.safetensors"), lambda h: h[name].update(shape=[16, 256]))
    with pytest.raises(ValueError, match="attn_q has shape"):  # the shape check names it
        loader.load_hf(d)


def test_loaded_arrays_stay_valid_after_the_checkpoint_closes(hf_dirs):
    ckpt = HFCheckpoint(hf_dirs / "single")
    views = {name: ckpt._where[name].raw(name) for name in ckpt.names}
    copies = {name: v.copy() for name, v in views.items()}
    ckpt.close()
    for name in views:
        np.testing.assert_array_equal(views[name], copies[name])


def outside_shard(tmp_path, hf_dirs) -> str:
    """A valid copy of the first shard outside the model directory."""
    os.makedirs(tmp_path / "outside", exist_ok=True)
    return str(shutil.copy(hf_dirs / "sharded" / SHARD, tmp_path / "outside" / SHARD))


def set_shard_path(d, path):
    with open(os.path.join(d, INDEX)) as f:
        index = json.load(f)
    index["weight_map"] = {k: path if v == SHARD else v for k, v in index["weight_map"].items()}
    with open(os.path.join(d, INDEX), "w") as f:
        json.dump(index, f)


@pytest.mark.parametrize("how", ["absolute", "climbing", "climbing through a subdirectory", "/etc/passwd"])
def test_index_cannot_name_files_outside_the_directory(hf_dirs, tmp_path, how):
    d = copy(hf_dirs, "sharded", tmp_path)
    outside = outside_shard(tmp_path, hf_dirs)
    os.makedirs(os.path.join(d, "sub"))
    path = {"absolute": outside, "climbing": f"../outside/{SHARD}",
            "climbing through a subdirectory": f"sub/../../outside/{SHARD}", "/etc/passwd": "/etc/passwd"}[how]
    set_shard_path(d, path)
    with pytest.raises(ValueError, match="is not the name of a file in the model directory"):
        HFCheckpoint(d)


@pytest.mark.parametrize("name", [SHARD, INDEX, "config.json", "model.safetensors"])
def test_symlinks_out_of_the_directory_are_refused(hf_dirs, tmp_path, name):
    d = copy(hf_dirs, "single" if name == "model.safetensors" else "sharded", tmp_path)
    outside = shutil.copy(os.path.join(d, name), tmp_path / "outside-file")
    os.remove(os.path.join(d, name))
    os.symlink(outside, os.path.join(d, name))
    with pytest.raises(ValueError, match=f"{name} leads outside the model directory"):
        HFCheckpoint(d)


def test_symlinks_inside_the_directory_are_followed(hf_dirs, tmp_path):
    d = copy(hf_dirs, "sharded", tmp_path)
    os.makedirs(os.path.join(d, "blobs"))
    os.rename(os.path.join(d, SHARD), os.path.join(d, "blobs", "abc"))
    os.symlink("blobs/abc", os.path.join(d, SHARD))
    os.symlink(os.path.join(d, "blobs"), os.path.join(d, "linked"))
    set_shard_path(d, "linked/abc")
    assert sorted(HFCheckpoint(d).names) == sorted(HFCheckpoint(hf_dirs / "sharded").names)


def test_hugging_face_hub_cache_layout_loads(hf_dirs, tmp_path):
    """huggingface_hub's cache: snapshots/<revision>/<file> -> ../../blobs/<hash>."""
    repo = tmp_path / "models--tiny"
    os.makedirs(repo / "blobs")
    os.makedirs(repo / "snapshots" / "rev")
    for i, name in enumerate(sorted(os.listdir(hf_dirs / "single"))):
        shutil.copy(hf_dirs / "single" / name, repo / "blobs" / f"hash{i}")
        os.symlink(f"../../blobs/hash{i}", repo / "snapshots" / "rev" / name)
    llm = LLM(str(repo / "snapshots" / "rev"), n_ctx=8, n_threads=1)
    assert llm.logits([1]).shape == (1, llm.config.vocab_size)


@pytest.mark.parametrize("index, problem", [
    ({"weight_map": {"model.norm.weight": 3}}, "no weight_map from tensor names to shard file names"),
    ({"weight_map": {"model.norm.weight": ["a"]}}, "no weight_map"),
    ({"weight_map": [SHARD]}, "no weight_map"),
    ([], "no weight_map"),
    ({"weight_map": {"model.norm.weight": "missing.safetensors"}}, "missing.safetensors: no such file"),
    ({"weight_map": {"model.norm.weight": ""}}, "'' is not the name of a file"),
    ({"weight_map": {"model.norm.weight": "sub"}}, "sub: no such file"),
    ({"weight_map": {"model.norm.weight": SHARD + "/"}}, f"{SHARD}/: no such file"),
    ({"weight_map": {"model.norm.weight": "a\u0000b"}}, "is not the name of a file"),
    ({"weight_map": {"no.such.tensor": SHARD}}, "listed but not found in their shard: \\['no.such.tensor'\\]"),
])
def test_bad_index_files(hf_dirs, tmp_path, index, problem):
    d = copy(hf_dirs, "sharded", tmp_path)
    os.makedirs(os.path.join(d, "sub"))
    with open(os.path.join(d, INDEX), "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match=problem):
        HFCheckpoint(d)


@pytest.mark.parametrize("name", ["config.json", INDEX])
@pytest.mark.parametrize("content, problem", [
    (b"{", "is not valid JSON: Expecting"), (b"\xff{}", "not UTF-8 at byte 0"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"), (b"[]", "not a JSON object|no weight_map"),
])
def test_bad_json_files(hf_dirs, tmp_path, name, content, problem):
    d = copy(hf_dirs, "sharded", tmp_path)
    with open(os.path.join(d, name), "wb") as f:
        f.write(content)
    with pytest.raises(ValueError, match=f"{name}.*({problem})"):
        HFCheckpoint(d)
