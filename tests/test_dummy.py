"""Random-weight models for benchmarks: they must load and run like real ones."""

import dataclasses

import numpy as np
import pytest

from tritlm import LLM
from tritlm.bench.dummy import dummy_config, write_dummy
from tritlm.formats.gguf import GGUFFile
from tritlm.models.config import ModelConfig

TINY = ModelConfig(arch="bitnet-b1.58", vocab_size=300, hidden_size=256, intermediate_size=512,
                   n_layers=2, n_heads=4, n_kv_heads=2, context_length=64, rope_theta=500000.0,
                   norm_eps=1e-5)


@pytest.mark.parametrize("ternary_type,embedding_type", [("I2_S", "F16"), ("TQ2_0", "Q8_0"), ("TQ1_0", "Q6_K")])
def test_dummy_model_loads_and_generates(tmp_path, ternary_type, embedding_type):
    path = tmp_path / "dummy.gguf"
    write_dummy(path, TINY, ternary_type=ternary_type, embedding_type=embedding_type)
    with GGUFFile(path) as f:
        assert f.tensors["blk.1.ffn_down.weight"].type_name == ternary_type
        assert f.tensors["blk.1.ffn_down.weight"].shape == (256, 512)
        assert f.tensors["token_embd.weight"].type_name == embedding_type
        # llama.h's file type, as bitnet.cpp's llama-quantize writes it into the published 2B4T file
        assert f.metadata["general.file_type"] == {"I2_S": 40, "TQ2_0": 37, "TQ1_0": 36}[ternary_type]
        assert np.isfinite(f.tensor_array("token_embd.weight")).all()
    llm = LLM(path, n_ctx=64)
    assert llm.config == dataclasses.replace(TINY, norm_eps=float(np.float32(TINY.norm_eps)))  # GGUF keeps f32
    tokens = llm.tokenize("hello")
    assert np.isfinite(llm.logits(tokens)).all()
    assert len(llm.create_completion(tokens, max_tokens=5, temperature=0)["choices"]) == 1


def test_cli_writes_a_preset(tmp_path, capsys):
    from tritlm.cli import main

    path = tmp_path / "m.gguf"
    assert main(["dummy", "-o", str(path), "--preset", "125M", "--arch", "bitnet", "--type", "TQ2_0"]) == 0
    with GGUFFile(path) as f:
        assert f.architecture == "bitnet"
        assert f.metadata["bitnet.block_count"] == 11
        assert f.tensors["blk.10.ffn_up.weight"].shape == (3072, 768)
        assert "blk.0.attn_sub_norm.weight" in f.tensors


def test_2b4t_preset_shape():
    c = dummy_config("2B4T")
    assert (c.hidden_size, c.intermediate_size, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size) == \
        (2560, 6912, 30, 20, 5, 128256)
    with pytest.raises(ValueError, match="unknown preset"):
        dummy_config("1T")


def test_a_progress_bar_over_the_tensors_on_a_terminal(tmp_path, monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    write_dummy(tmp_path / "quiet.gguf", TINY)  # the library call stays quiet
    assert terminal.getvalue() == ""
    write_dummy(tmp_path / "m.gguf", TINY, progress=True)  # as `tritlm dummy` calls it
    assert "writing" in terminal.getvalue() and "B/s]" in terminal.getvalue()  # over the file's bytes


@pytest.mark.parametrize("ternary_type", ["I2_S", "TQ2_0", "TQ1_0"])
def test_random_tensors_are_valid_and_near_uniform(ternary_type, monkeypatch):
    from tritlm.bench import dummy
    from tritlm.quant import layouts

    monkeypatch.setattr(dummy, "CHUNK", 4096)  # several chunks per tensor
    shape = (96, 512)
    data = dummy.random_packed(ternary_type, shape, np.random.default_rng(1))
    ternary, scale = layouts.FILE_LAYOUTS[ternary_type][1](data, shape)
    assert ternary.shape == shape and np.isin(ternary, [-1, 0, 1]).all()
    np.testing.assert_allclose(scale, 0.02, rtol=1e-3)  # (f16 block scales in TQ*)
    counts = np.bincount(ternary.reshape(-1) + 1, minlength=3) / ternary.size
    assert np.abs(counts - 1 / 3).max() < 0.01
    assert not (ternary[:32] == ternary[32:64]).all()  # chunks differ


def test_a_file_written_with_drop_behind_is_the_same(tmp_path, monkeypatch):
    from tritlm.formats.gguf import GGUFWriter

    monkeypatch.setattr(GGUFWriter, "DROP_EVERY", 1000)  # drop after nearly every tensor
    write_dummy(tmp_path / "a.gguf", TINY)
    monkeypatch.setattr(GGUFWriter, "DROP_EVERY", 1 << 62)
    write_dummy(tmp_path / "b.gguf", TINY)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
