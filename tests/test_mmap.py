"""Memory-mapped weights (Engine(mmap=True), runtime/weight_cache.py): the cache file holds the
arena's exact bytes, is reused while the model file is unchanged, and is rebuilt, never trusted,
when the model file or the cache itself is not what its header says."""

import os
import warnings

import numpy as np
import pytest
from tiny_models import write_bitnet, write_tokenizer

from tritlm import LLM
from tritlm.cli import main
from tritlm.formats.region import FileRegion
from tritlm.models import loader
from tritlm.runtime import Engine, memory, weight_cache

TOKENS = np.random.default_rng(0).integers(0, 320, 12).tolist()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A GGUF model whose rows are multiples of 256 (tiles5 takes them), to copy per test."""
    directory = write_bitnet(tmp_path_factory.mktemp("hf"), "autobitlinear", hidden_size=256, intermediate_size=512)
    write_tokenizer(directory)
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    assert main(["convert", str(directory), "-o", str(path)]) == 0  # (I2_S)
    return path.read_bytes()


@pytest.fixture
def gguf(source, tmp_path, monkeypatch):
    """This test's own copy of the model, and a cache directory of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "models").mkdir()
    path = tmp_path / "models" / "model.gguf"
    path.write_bytes(source)
    return path


def engine(path, **options) -> Engine:
    config, tensors, _ = loader.load(path)
    return Engine(config, tensors, n_ctx=64, **options)


def greedy(engine: Engine, n: int = 4) -> tuple[list[int], np.ndarray]:
    """Greedy continuation of TOKENS, token by token, and every step's logits."""
    seq, tokens, logits = engine.new_sequence(), list(TOKENS), []
    step = engine.forward([(seq, tokens)])[0]
    for _ in range(n):
        logits.append(step)
        tokens.append(int(step[0].argmax()))
        step = engine.forward([(seq, tokens[-1:])])[0]
    return tokens, np.concatenate(logits)


def cache_files(*directories) -> list:
    return sorted(p for d in directories if d.is_dir() for p in d.iterdir() if p.name.endswith(".tritlm-weights"))


@pytest.mark.parametrize("layout", ["tiles", "tiles5"])
def test_mapped_weights_give_the_same_tokens_and_logits(gguf, layout):
    copied = engine(gguf, weight_layout=layout)
    written, mapped = engine(gguf, weight_layout=layout, mmap=True), engine(gguf, weight_layout=layout, mmap=True)
    assert written.weight_cache == mapped.weight_cache == cache_files(gguf.parent)[0]
    assert {m.layout for layer in mapped.layers for m in layer.matrices} == {layout}
    assert not mapped.weights.flags.writeable and isinstance(mapped.weights, np.memmap)
    np.testing.assert_array_equal(mapped.weights, copied.weights)  # the arena, byte for byte
    expected_tokens, expected_logits = greedy(copied)
    for e in (written, mapped):
        tokens, logits = greedy(e)
        assert tokens == expected_tokens
        np.testing.assert_array_equal(logits, expected_logits)


def test_a_warm_start_reads_no_weight_and_rewrites_nothing(gguf, monkeypatch):
    first = engine(gguf, mmap=True).weight_cache
    before = os.stat(first)
    reads = []
    real = FileRegion.read_into
    monkeypatch.setattr(FileRegion, "read_into", lambda self, out, **kw: reads.append(self) or real(self, out, **kw))
    second = engine(gguf, mmap=True).weight_cache
    after = os.stat(second)
    assert second == first and reads == []
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # another layout is another file
    other = "tiles5" if "tiles5" not in first.name else "tiles"
    assert engine(gguf, mmap=True, weight_layout=other).weight_cache != first


def rewritten(path, change) -> None:
    """Apply change(bytearray) to the file, keeping its size, then restore its mtime."""
    stat = os.stat(path)
    data = bytearray(path.read_bytes())
    change(data)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == stat.st_mtime_ns and os.stat(path).st_size == stat.st_size


def flip_a_weight(path):
    """change(bytearray) for `rewritten`: another ternary code for the first weight of blk.0.attn_q
    (I2_S: its code in the top two bits of the tensor's first byte)."""
    offset = loader.load(path)[1]["blk.0.attn_q"].region.offset

    def change(data: bytearray) -> None:
        code = 2 if data[offset] >> 6 == 1 else 1
        data[offset] = (data[offset] & 0x3F) | code << 6
    return change


@pytest.mark.parametrize("change", ["mtime", "size", "bytes"])
def test_a_changed_model_file_rebuilds_the_cache(gguf, change):
    cache = engine(gguf, mmap=True).weight_cache
    before = os.stat(cache)
    if change == "mtime":
        os.utime(gguf, ns=(before.st_atime_ns, os.stat(gguf).st_mtime_ns + 10**9))
    elif change == "size":
        with open(gguf, "ab") as f:
            f.write(b"\0" * 64)  # (GGUF readers ignore bytes past the last tensor)
    else:
        rewritten(gguf, flip_a_weight(gguf))
    with pytest.warns(UserWarning, match="model file's .*changed since it was written; rebuilding it"):
        rebuilt = engine(gguf, mmap=True)
    assert rebuilt.weight_cache == cache and os.stat(cache).st_ino != before.st_ino
    tokens, logits = greedy(rebuilt)
    np.testing.assert_array_equal(logits, greedy(engine(gguf))[1])  # the new bytes, not the stale ones


@pytest.mark.parametrize("damage", ["truncated", "longer", "bad magic", "bad header", "other arena size"])
def test_a_damaged_cache_is_rebuilt(gguf, damage):
    cache = engine(gguf, mmap=True).weight_cache
    data = bytearray(cache.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "longer":
        data += b"\0" * 64
    elif damage == "bad magic":
        data[:4] = b"GGUF"
    elif damage == "bad header":
        data[12:20] = b"\xff" * 8  # inside the JSON
    else:  # another value of as many digits: the header stays readable
        at = data.index(b'"arena_nbytes": ') + len(b'"arena_nbytes": ')
        data[at] = ord("1") if data[at] != ord("1") else ord("2")
    cache.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="rebuilding it"):
        rebuilt = engine(gguf, mmap=True)
    assert rebuilt.weight_cache == cache
    np.testing.assert_array_equal(greedy(rebuilt)[1], greedy(engine(gguf))[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine(gguf, mmap=True)  # and valid again: no warning


def test_the_cache_file_appears_whole_or_not_at_all(gguf, monkeypatch):
    """A load killed while writing the cache leaves no file under the trusted name (nor a temporary one)."""
    from tritlm.runtime import engine as engine_module

    real, packed, partial = engine_module._Arena.pack, [], []

    def interrupted(self, *args, **kwargs):
        if len(packed) == 2:  # a few matrices in
            partial.extend(p.name for p in gguf.parent.iterdir() if p.name.endswith(".tmp"))
            raise KeyboardInterrupt
        packed.append(real(self, *args, **kwargs))
        return packed[-1]

    monkeypatch.setattr(engine_module._Arena, "pack", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine(gguf, mmap=True)
    assert partial and [p.name for p in gguf.parent.iterdir()] == ["model.gguf"]


def test_a_model_file_that_cannot_be_read_is_its_own_error(gguf, monkeypatch):
    """An error reading the model while the cache is written is that error (not "no directory
    takes the cache", nor a retry elsewhere), and leaves no file behind."""
    def unreadable(self, out, **kwargs):
        raise OSError(5, "Input/output error", self.path)

    monkeypatch.setattr(FileRegion, "read_into", unreadable)
    with pytest.raises(OSError, match="Input/output error"):
        engine(gguf, mmap=True)
    assert [p.name for p in gguf.parent.iterdir()] == ["model.gguf"] and not weight_cache.cache_dir().exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_model_directory_puts_the_cache_in_the_cache_directory(gguf, tmp_path):
    os.chmod(gguf.parent, 0o555)
    try:
        cache = engine(gguf, mmap=True).weight_cache
        assert cache.parent == weight_cache.cache_dir() == tmp_path / "xdg" / "tritlm" / "weights"
        assert cache_files(gguf.parent) == []
        assert engine(gguf, mmap=True).weight_cache == cache
        np.testing.assert_array_equal(greedy(engine(gguf, mmap=True))[1], greedy(engine(gguf))[1])
    finally:
        os.chmod(gguf.parent, 0o755)


def test_a_model_directory_that_refuses_the_file_puts_it_in_the_cache_directory(gguf, monkeypatch):
    """As the chmod test above, where it is skipped (root): the model's directory takes no file."""
    real = weight_cache.tempfile.mkstemp

    def refusing(*args, dir, **kwargs):
        if os.path.samefile(dir, gguf.parent):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(weight_cache.tempfile, "mkstemp", refusing)
    cache = engine(gguf, mmap=True).weight_cache
    assert cache.parent == weight_cache.cache_dir() and cache_files(gguf.parent) == []
    monkeypatch.setattr(weight_cache.tempfile, "mkstemp", lambda *a, **kw: pytest.fail("written again"))
    assert engine(gguf, mmap=True).weight_cache == cache


def test_weights_larger_than_the_memory_load_mapped(gguf, monkeypatch):
    """The weights need not fit with mmap (the page cache streams them); the KV cache and the
    scratch still must."""
    needs = []
    real = memory.check_fits
    monkeypatch.setattr(memory, "check_fits", lambda options, *a: needs.append(dict(options)) or real(options, *a))
    engine(gguf, weight_layout="tiles")
    copied = needs[0]["tiles"]
    mapped = needs[0]["mmap=True (--mmap: weights mapped from a cache file)"]
    assert mapped.mapped and mapped.total == copied.total - copied.weights - copied.floats
    monkeypatch.setattr(memory, "available_memory", lambda: mapped.total + copied.weights // 2)
    with pytest.raises(ValueError, match=r"needs .* it would fit with .*mmap=True"):
        engine(gguf, weight_layout="tiles")
    assert engine(gguf, weight_layout="tiles", mmap=True).weight_cache is not None
    monkeypatch.setattr(memory, "available_memory", lambda: mapped.total - 1)
    with pytest.raises(ValueError, match=r"memory-mapped \(not counted\), .* KV cache"):
        engine(gguf, weight_layout="tiles", mmap=True)


def test_only_a_gguf_file_maps(tmp_path):
    directory = write_bitnet(tmp_path / "hf", "autobitlinear")
    config, tensors = loader.load_hf(directory)
    with pytest.raises(ValueError, match="needs a GGUF model file"):
        Engine(config, tensors, n_ctx=16, mmap=True)


def test_llm_and_cli_take_mmap(gguf, capsys):
    llm = LLM(gguf, n_ctx=64, mmap=True)
    assert llm.engine.weight_cache is not None
    with pytest.raises(ValueError, match="mmap is the CPU engine's"):
        LLM(gguf, mmap=True, device="cuda")
    from tritlm.cli import build_parser

    for command in (["run", "-p", "x"], ["serve"], ["bench"]):
        assert build_parser().parse_args([*command, "-m", str(gguf), "--mmap"]).mmap
    outputs = []
    for options in ([], ["--mmap"]):
        assert main(["run", "-m", str(gguf), "-p", "def f(x):", "-n", "6", "-temp", "0", *options]) == 0
        outputs.append(capsys.readouterr().out.splitlines()[0])
    assert outputs[0] == outputs[1]
    assert main(["bench", "-m", str(gguf), "-p", "4", "-n", "2", "-t", "1", "-r", "1", "--mmap"]) == 0
    assert "weights mapped from " in capsys.readouterr().out
