"""Model loading against transformers: every architecture family and HF checkpoint flavour, read
from the Hugging Face directory and from the GGUF file tritlm writes from it.

The logits here come from the NumPy reference forward (exact ternary x int8 arithmetic); the
engine is checked against the same oracle in test_engine.py.

Tolerance: transformers runs BitNet as float32 fake quantization, whose GEMMs carry ~1e-6
relative noise; where an activation sits that close to an int8 rounding boundary the two sides
round differently and later logits move by ~1e-3. That happens in about one random tiny model in
six; the seeds below do not hit one, and without such a flip the two agree to ~3e-7.
"""

import gguf
import numpy as np
import pytest
from tiny_models import relative_error, transformers_logits, write_bitnet

from tritlm.models import export, loader, reference
from tritlm.runtime import Engine

TOKENS = np.random.default_rng(0).integers(0, 320, 64)
MODELS = [  # (model_type, flavour, overrides): each family, each checkpoint flavour
    ("bitnet", "online", {}),
    ("bitnet", "autobitlinear", {}),
    ("bitnet", "bitlinear", {}),
    ("bitnet", "bitlinear", {"hidden_act": "silu"}),  # the 1bitLLM block: arch "bitnet"
    ("llama", "bitlinear", {}),
    ("llama", "online", {}),
]


@pytest.fixture(scope="module", params=MODELS, ids=lambda m: f"{m[0]}-{m[1]}-{m[2].get('hidden_act', '')}")
def hf_model(request, tmp_path_factory):
    model_type, flavour, overrides = request.param
    directory = write_bitnet(tmp_path_factory.mktemp("hf"), flavour, model_type=model_type, **overrides)
    return directory, transformers_logits(directory, TOKENS)


def test_hf_directory_matches_transformers(hf_model):
    directory, expected = hf_model
    config, tensors = loader.load_hf(directory)
    assert relative_error(reference.forward(config, tensors, TOKENS), expected) < 1e-3


def test_written_gguf_matches_transformers(hf_model, tmp_path):
    directory, expected = hf_model
    config, tensors = loader.load_hf(directory)
    path = tmp_path / "model.gguf"
    export.write_gguf_model(path, config, tensors, ternary_type="I2_S", embedding_type="F16")
    config2, tensors2, metadata = loader.load_gguf(path)
    assert metadata["general.architecture"] == config.arch
    assert metadata["general.file_type"] == 40  # bitnet.cpp's LLAMA_FTYPE_MOSTLY_I2_S
    assert config2.rope_style == ("norm" if config.family == "llama" else "neox")
    assert relative_error(reference.forward(config2, tensors2, TOKENS), expected) < 1e-3


@pytest.mark.parametrize("ternary_type", ["TQ2_0", "TQ1_0"])
def test_llama_cpp_types_read_back_by_gguf_package(tmp_path, ternary_type):
    directory = write_bitnet(tmp_path / "hf", "autobitlinear", hidden_size=256, intermediate_size=512)
    config, tensors = loader.load_hf(directory)
    path = tmp_path / "model.gguf"
    export.write_gguf_model(path, config, tensors, ternary_type=ternary_type)
    _, ours, _ = loader.load_gguf(path)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType[f"MOSTLY_{ternary_type}"]
    checked = 0
    for t in reader.tensors:
        stem = t.name.removesuffix(".weight")
        if isinstance(ours[stem], loader.TernaryTensor):
            theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours[stem].shape)
            np.testing.assert_array_equal(ours[stem].ternary * ours[stem].scale[:, None], theirs)
            # and what we wrote holds the checkpoint's ternary values, scales rounded to f16
            np.testing.assert_array_equal(ours[stem].ternary, tensors[stem].ternary)
            np.testing.assert_array_equal(ours[stem].scale, tensors[stem].scale.astype(np.float16))
            checked += 1
    assert checked == 7 * config.n_layers


def test_unsupported_architecture_lists_supported(tmp_path):
    path = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*bitnet-b1.58"):
        loader.load(path)


def test_missing_tensor_is_named(tmp_path):
    directory = write_bitnet(tmp_path / "hf", "bitlinear")
    config, tensors = loader.load_hf(directory)
    del tensors["blk.1.ffn_up"]
    path = tmp_path / "model.gguf"
    export.write_gguf_model(path, config, tensors)
    with pytest.raises(ValueError, match="blk.1.ffn_up"):
        loader.load_gguf(path)


def test_all_zero_ternary_matrix_warns(tmp_path):
    directory = write_bitnet(tmp_path / "hf", "bitlinear")
    config, tensors = loader.load_hf(directory)
    tensors["blk.0.attn_k"].ternary[:] = 0
    path = tmp_path / "model.gguf"
    export.write_gguf_model(path, config, tensors)
    with pytest.warns(UserWarning, match="blk.0.attn_k: every weight is zero"):
        Engine(*loader.load_gguf(path)[:2], n_ctx=8)


def test_not_a_model_path(tmp_path):
    with pytest.raises(ValueError, match="no such model"):
        loader.load(tmp_path / "missing.gguf")
