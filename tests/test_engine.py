"""The engine (C++ kernels and ops) against transformers and against itself:
KV-cache decoding, batching and chunked prefill must reproduce one full forward bit for bit."""

import os
import re

import numpy as np
import pytest
from tiny_models import relative_error, transformers_logits, write_bitnet

from tritlm import _native, kernels
from tritlm.kernels import TernaryMatrix
from tritlm.models import export, loader, reference
from tritlm.runtime import Engine

TOKENS = np.random.default_rng(0).integers(0, 320, 64).tolist()
FAMILIES = [("bitnet", "autobitlinear", {}), ("bitnet", "online", {}), ("bitnet", "bitlinear", {}),
            ("bitnet", "bitlinear", {"hidden_act": "silu"}), ("llama", "bitlinear", {})]


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda m: f"{m[0]}-{m[1]}-{m[2].get('hidden_act', '')}")
def model(request, tmp_path_factory):
    model_type, flavour, overrides = request.param
    directory = write_bitnet(tmp_path_factory.mktemp("hf"), flavour, model_type=model_type, **overrides)
    config, tensors = loader.load_hf(directory)
    gguf_path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    export.write_gguf_model(gguf_path, config, tensors, ternary_type="I2_S")
    return directory, gguf_path, transformers_logits(directory, TOKENS)


def full_forward(engine, tokens):
    return engine.forward([(engine.new_sequence(), tokens)], all_logits=True)[0]


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_logits_match_transformers(model, source):
    directory, gguf_path, expected = model
    config, tensors, _ = loader.load(directory if source == "hf" else gguf_path)
    engine = Engine(config, tensors, kv_type="f32")
    assert relative_error(full_forward(engine, TOKENS), expected) < 1e-3
    # and the exact-arithmetic NumPy reference agrees with the engine to float rounding
    assert relative_error(full_forward(engine, TOKENS), reference.forward(config, tensors, np.array(TOKENS))) < 1e-3


@pytest.mark.parametrize("ternary_type", ["I2_S", "TQ1_0"])
def test_weight_layouts_give_the_same_logits(tmp_path, ternary_type):
    """tiles (2 bits) and tiles5 (1.625 bits) hold the same weights, packed from any file layout:
    the logits agree bit for bit."""
    directory = write_bitnet(tmp_path / "hf", "autobitlinear", hidden_size=256, intermediate_size=512)
    path = tmp_path / "model.gguf"
    export.write_gguf_model(path, *loader.load_hf(directory), ternary_type=ternary_type)
    config, tensors, _ = loader.load(path)
    engines = {layout: Engine(config, tensors, weight_layout=layout) for layout in ("tiles", "tiles5")}
    assert {m.layout for m in engines["tiles5"].layers[0].matrices} == {"tiles5"}
    np.testing.assert_array_equal(full_forward(engines["tiles"], TOKENS), full_forward(engines["tiles5"], TOKENS))


@pytest.mark.parametrize("kv_type", ["f32", "f16"])
def test_token_by_token_equals_full_forward(model, kv_type):
    config, tensors, _ = loader.load(model[1])
    engine = Engine(config, tensors, kv_type=kv_type)
    full = full_forward(engine, TOKENS)
    seq = engine.new_sequence()
    steps = [engine.forward([(seq, [t])])[0] for t in TOKENS]
    np.testing.assert_array_equal(np.concatenate(steps), full)


def test_f16_cache_stays_close(model):
    config, tensors, _ = loader.load(model[1])
    f32 = full_forward(Engine(config, tensors, kv_type="f32"), TOKENS)
    f16 = full_forward(Engine(config, tensors, kv_type="f16"), TOKENS)
    assert relative_error(f16, f32) < 1e-2


def test_chunked_prompt_gives_its_last_logits(model):
    """A prompt longer than prefill_chunk runs in chunks whose logits nobody keeps (a step that
    returns no rows at all), then its last token's."""
    config, tensors, _ = loader.load(model[1])
    engine = Engine(config, tensors, prefill_chunk=16)
    last = engine.forward([(engine.new_sequence(), TOKENS)])[0]
    np.testing.assert_array_equal(last, full_forward(engine, TOKENS)[-1:])


def test_batching_and_chunking_change_nothing(model):
    config, tensors, _ = loader.load(model[1])
    engine = Engine(config, tensors, prefill_chunk=7)
    prompts = [TOKENS[:40], TOKENS[10:13], TOKENS[5:64]]
    alone = [full_forward(Engine(config, tensors), p) for p in prompts]
    together = engine.forward([(engine.new_sequence(), p) for p in prompts], all_logits=True)
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


def test_greedy_continuation_matches_transformers(model):
    import torch

    directory, gguf_path, _ = model
    config, tensors, _ = loader.load(gguf_path)
    engine = Engine(config, tensors, kv_type="f32")
    seq = engine.new_sequence()
    logits = engine.forward([(seq, TOKENS[:16])])[0][-1]
    ours = []
    for _ in range(32):
        ours.append(int(np.argmax(logits)))
        logits = engine.forward([(seq, [ours[-1]])])[0][-1]

    import json
    from tiny_models import _classes
    with open(f"{directory}/config.json") as f:
        _, model_class = _classes(json.load(f)["model_type"])
    hf = model_class.from_pretrained(directory, dtype=torch.float32)
    torch.nn.Module.float(hf).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([TOKENS[:16]]), max_new_tokens=32, do_sample=False,
                          min_new_tokens=32, pad_token_id=0)
    assert ours == out[0, 16:].tolist()


def test_context_and_token_errors(model):
    config, tensors, _ = loader.load(model[1])
    engine = Engine(config, tensors, n_ctx=32)
    seq = engine.new_sequence()
    with pytest.raises(ValueError, match="exceed the context of 32"):
        engine.forward([(seq, TOKENS[:33])])
    with pytest.raises(ValueError, match="token ids must be in"):
        engine.forward([(seq, [config.vocab_size])])
    with pytest.raises(ValueError, match="no tokens"):
        engine.forward([(seq, [])])
    with pytest.raises(ValueError, match="kv_type"):
        Engine(config, tensors, kv_type="q4")


@pytest.mark.parametrize("key, shape", [("attn_output", (256, 512)), ("attn_output", (256, 2048)),
                                        ("gate_up", (1024, 512))])
def test_native_step_refuses_matrices_that_do_not_fit(tmp_path, key, shape):
    """The C++ step checks every matrix against the model's dimensions itself, whatever Python let
    through: a matrix with the wrong K would read past the step's activation buffers."""
    directory = write_bitnet(tmp_path / "hf", "autobitlinear", hidden_size=256, intermediate_size=512)
    engine = Engine(*loader.load_hf(directory))
    c = engine.config
    layers = [layer.norms | {"qkv": layer.qkv, "attn_output": layer.attn_output, "gate_up": layer.gate_up,
                             "ffn_down": layer.ffn_down, "theta": c.rope_theta, "window": 0} for layer in engine.layers]
    dims = {"hidden": c.hidden_size, "ffn": c.intermediate_size, "heads": c.n_heads, "kv_heads": c.n_kv_heads,
            "head_dim": c.head_dim, "vocab": c.vocab_size, "eps": c.norm_eps, "attention_scale": c.attention_scale,
            "neox": True, "activation": "relu2", "embedding_scale": 1.0}
    args = (engine.embedding.data, engine.embedding.type, engine.head.data, engine.head.type,
            np.ones(c.hidden_size, np.float32))
    _native.Model(dims, layers, *args)  # the model as it is builds
    norm = layers[0][key][0][0]
    layers[0][key] = [(norm, TernaryMatrix(np.ones(shape, np.int8), np.ones(shape[0], np.float32)))]
    with pytest.raises(ValueError, match=f"{key}: "):
        _native.Model(dims, layers, *args)


@pytest.mark.parametrize("load, cores, expected", [(0.0, 2, 2), (0.4, 2, 2), (1.0, 2, 1), (1.6, 2, 1),
                                                   (7.5, 2, 1), (2.2, 8, 6), (0.0, 1, 1)])
def test_default_threads_leave_busy_cores_out(monkeypatch, load, cores, expected):
    """The engine's default: the cores other work leaves idle, by the 1-minute load average."""
    monkeypatch.setattr(kernels.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(kernels, "default_threads", lambda: cores)
    assert kernels.idle_cores() == expected


@pytest.fixture
def gguf_256(tmp_path):
    """A GGUF model whose rows are multiples of 256 (tiles5 takes it)."""
    directory = write_bitnet(tmp_path / "hf", "autobitlinear", hidden_size=256, intermediate_size=512)
    path = tmp_path / "model.gguf"
    export.write_gguf_model(path, *loader.load_hf(directory), ternary_type="I2_S")
    return path


def refusing_allocation(monkeypatch):
    """Make the arena's allocation and every file read fail the test: a refusal must come first."""
    from tritlm.formats.region import FileRegion

    def fail(*args, **kwargs):
        raise AssertionError("allocated or read before the memory check")

    monkeypatch.setattr(_native, "empty_streaming", fail)
    monkeypatch.setattr(FileRegion, "read_into", fail)


def test_a_model_that_cannot_fit_is_refused_before_anything_is_allocated(gguf_256, monkeypatch):
    from tritlm.runtime import memory

    config, tensors, _ = loader.load(gguf_256)
    Engine(config, tensors, n_ctx=64)  # fits here
    refusing_allocation(monkeypatch)
    monkeypatch.setattr(memory, "available_memory", lambda: 10_000_000)  # 10 MB: nothing fits
    with pytest.raises(ValueError, match=r"needs \d+\.\d GB, 0\.0 GB available .*no weight layout or context"):
        Engine(config, tensors, n_ctx=64)


def test_the_refusal_names_what_would_fit(gguf_256, monkeypatch):
    from tritlm.runtime import memory

    config, tensors, _ = loader.load(gguf_256)
    needs = {}
    real = memory.check_fits
    monkeypatch.setattr(memory, "check_fits", lambda options, *a: needs.update(options) or real(options, *a))
    Engine(config, tensors, n_ctx=64, weight_layout="tiles")
    tiles, tiles5 = needs["tiles"].total, needs["weight_layout='tiles5' (--weight-layout tiles5: 1.6 bits per weight)"].total
    assert tiles5 < tiles
    kv64 = needs["tiles"].kv
    assert kv64 == config.n_layers * 2 * 64 * config.n_kv_heads * config.head_dim * 2  # f16, one sequence
    refusing_allocation(monkeypatch)
    # room for tiles5 but not for tiles: the 1.6-bit layout is suggested, with the context that fits tiles
    monkeypatch.setattr(memory, "available_memory", lambda: (tiles + tiles5) // 2)
    with pytest.raises(ValueError, match=r"needs .* GB available .*it would fit with .*weight_layout='tiles5'"):
        Engine(config, tensors, n_ctx=64, weight_layout="tiles")
    # a long context that does not fit: a shorter one is named
    monkeypatch.setattr(memory, "available_memory", lambda: tiles - kv64 // 2)
    with pytest.raises(ValueError, match=r"it would fit with n_ctx=(\d+) or less") as refusal:
        Engine(config, tensors, n_ctx=64, weight_layout="tiles")
    max_ctx = int(re.search(r"fit with n_ctx=(\d+) or less", str(refusal.value))[1])
    assert 16 <= max_ctx < 64
    monkeypatch.setenv("TRITLM_MEMORY_CHECK", "0")  # the way around it: then the allocation comes
    with pytest.raises(AssertionError, match="before the memory check"):
        Engine(config, tensors, n_ctx=64, weight_layout="tiles")


@pytest.mark.parametrize("room", ["plenty", "for the arena alone"])
def test_loading_reads_the_file_once_and_drops_its_pages(gguf_256, monkeypatch, room):
    """Each tensor is read once; where the arena and the file's pages would not both fit in
    memory, the pages are dropped from the page cache behind each read."""
    from tritlm.formats.region import FileRegion
    from tritlm.runtime import memory

    config, tensors, _ = loader.load(gguf_256)
    if room != "plenty":
        needs = []
        real = memory.check_fits
        monkeypatch.setattr(memory, "check_fits", lambda options, *a: needs.append(options[0][1]) or real(options, *a))
        Engine(config, tensors)
        monkeypatch.setattr(memory, "available_memory", lambda: needs[0].total + 1000)
    else:
        monkeypatch.setattr(memory, "available_memory", lambda: 1 << 40)
    reads, advice = [], []
    real_read, real_fadvise = FileRegion.read_into, getattr(loader.os, "posix_fadvise", None)
    monkeypatch.setattr(FileRegion, "read_into", lambda self, out, **kw: reads.append((self, kw)) or
                        real_read(self, out, **kw))
    if real_fadvise is not None:
        import os
        monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, n, how: advice.append((offset, n, how)) or
                            real_fadvise(fd, offset, n, how))
    Engine(config, tensors)
    regions = [r for r, _ in reads]
    stored = [t for t in tensors.values() if isinstance(t, loader.StoredTernary)]
    floats = [t for t in tensors.values() if isinstance(t, loader.FloatMatrix)]
    assert floats and len(regions) == len(set(regions)) == len(stored) + len(floats)  # each tensor once
    drop = room != "plenty"
    assert all(kw.get("drop_behind") is drop for _, kw in reads)
    if real_fadvise is not None:
        import os
        assert sorted(advice) == sorted((r.offset, r.nbytes, os.POSIX_FADV_DONTNEED) for r in regions if drop)


def test_available_memory_respects_a_cgroup_limit(tmp_path):
    from tritlm.runtime import memory

    (tmp_path / "meminfo").write_text("MemTotal:       24683784 kB\nMemAvailable:   23313000 kB\n")
    assert memory._meminfo_available(str(tmp_path / "meminfo")) == 23313000 * 1024
    root, group = tmp_path / "cgroup", tmp_path / "cgroup" / "a" / "b"
    group.mkdir(parents=True)
    (tmp_path / "self").write_text("0::/a/b\n")
    assert memory._cgroup_room(str(root), str(tmp_path / "self")) is None  # no limit anywhere
    (root / "a" / "memory.max").write_text("max\n")
    (group / "memory.max").write_text("1000000\n")
    (group / "memory.current").write_text("600000\n")
    (group / "memory.stat").write_text("anon 500000\ninactive_file 100000\n")  # reclaimable
    assert memory._cgroup_room(str(root), str(tmp_path / "self")) == 500000
    (root / "a" / "memory.max").write_text("700000\n")  # a parent's tighter limit counts too
    (root / "a" / "memory.current").write_text("600000\n")
    assert memory._cgroup_room(str(root), str(tmp_path / "self")) == 100000
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(1 << 62))  # v1's "no limit"
    (tmp_path / "self1").write_text("5:memory:/\n")
    assert memory._cgroup_room(str(v1), str(tmp_path / "self1")) is None
    (v1 / "memory" / "memory.limit_in_bytes").write_text("2000000")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("500000")
    assert memory._cgroup_room(str(v1), str(tmp_path / "self1")) == 1500000
    assert memory.available_memory() > 0  # this machine's


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer reserves more address space than the limit allows")
def test_available_memory_respects_an_address_space_limit():
    """(`ulimit -v`: what fuzzing's children run under) in a child, the limit set there"""
    import subprocess
    import sys

    code = ("import resource; from tritlm.runtime import memory; "
            "resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30)); print(memory.available_memory())")
    room = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < room < 8 << 30
