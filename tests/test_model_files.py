"""Model files whose parts do not fit together, or hold values of the wrong type or range: loading
one (`tritlm.LLM`, `tritlm info`) is a ValueError naming the tensor, key or file, raised before
anything is sized or built from it, never another exception, a hang or a model that computes
garbage. GGUF files are a good tiny model with one thing changed; Hugging Face directories a
good one with one JSON value changed."""

import json
import math
import re
import shutil

import numpy as np
import pytest
from tiny_models import write_bitnet, write_tokenizer

from tritlm import LLM
from tritlm.bench.dummy import random_ternary, write_dummy
from tritlm.cli import main
from tritlm.formats.gguf import GGUFFile, GGUFValue, TensorType, ValueType, write_gguf
from tritlm.models.config import ModelConfig
from tritlm.models.loader import FloatMatrix
from tritlm.quant import layouts
from tritlm.tokenizer import Tokenizer

TINY = ModelConfig(arch="bitnet-b1.58", vocab_size=300, hidden_size=256, intermediate_size=512,
                   n_layers=2, n_heads=4, n_kv_heads=2, context_length=64, rope_theta=500000.0,
                   norm_eps=1e-5)
A = "bitnet-b1.58."  # the metadata keys' prefix


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "tiny.gguf"
    write_dummy(path, TINY)
    return path


def variant(good, tmp_path, metadata=None, tensors=None):
    """A copy of the GGUF file `good` with metadata replaced, and tensors replaced or added:
    name -> (type name, shape), filled with random values."""
    rng = np.random.default_rng(0)
    with GGUFFile(good) as f:
        fields = f.fields | (metadata or {})
        out = {name: (t.type, t.shape, np.array(f.tensor_data(name))) for name, t in f.tensors.items()}
    for name, (type_name, shape) in (tensors or {}).items():
        if type_name in layouts.FILE_LAYOUTS:
            data = layouts.FILE_LAYOUTS[type_name][0](random_ternary(shape, rng), np.float32(0.02))
        else:
            data = np.ones(shape, np.float16 if type_name == "F16" else np.float32)
        out[name] = (TensorType[type_name], shape, data)
    path = tmp_path / "variant.gguf"
    write_gguf(path, fields, [(name, *entry) for name, entry in out.items()])
    return path


def every_layer(kind: str, type_name: str, shape) -> dict:
    return {f"blk.{i}.{kind}.weight": (type_name, shape) for i in range(TINY.n_layers)}


def test_the_good_file_loads(good_gguf):
    assert LLM(good_gguf, n_ctx=16).config.n_layers == 2


# ------------------------------------------------------------------------ tensor shapes


@pytest.mark.parametrize("tensors, name", [
    # the reproduced out-of-bounds reads: a row length K that is not the configuration's
    (every_layer("attn_output", "I2_S", (256, 512)), "blk.0.attn_output"),
    (every_layer("attn_output", "I2_S", (256, 2048)), "blk.0.attn_output"),
    (every_layer("ffn_gate", "I2_S", (512, 512)) | every_layer("ffn_up", "I2_S", (512, 512)),
     "blk.0.ffn_gate"),
    (every_layer("attn_k", "I2_S", (256, 256)), "blk.0.attn_k"),  # rows: 2 KV heads x 64
    (every_layer("attn_norm", "F32", (512,)), "blk.0.attn_norm"),
    (every_layer("ffn_sub_norm", "F32", (256,)), "blk.0.ffn_sub_norm"),
    ({"token_embd.weight": ("F16", (300, 512))}, "token_embd"),
    ({"output.weight": ("F16", (301, 256))}, "output"),
], ids=["attn_output-K512", "attn_output-K2048", "ffn_gate_up-K512", "attn_k-rows", "attn_norm",
        "ffn_sub_norm", "token_embd", "output"])
def test_tensor_shapes_must_fit_the_configuration(good_gguf, tmp_path, tensors, name):
    path = variant(good_gguf, tmp_path, tensors=tensors)
    with pytest.raises(ValueError, match=rf"tensor {re.escape(name)} has shape .* needs"):
        LLM(path, n_ctx=16)


@pytest.mark.parametrize("tensors, metadata, name", [
    ({"blk.0.attn_q.bias": ("F32", (256,))}, {}, "blk.0.attn_q.bias"),  # a bias tritlm would skip
    ({"rope_freqs.weight": ("F32", (32,))}, {}, "rope_freqs"),
    ({}, {A + "block_count": 1}, "blk.1."),  # a layer beyond block_count
])
def test_tensors_the_model_does_not_have_are_refused(good_gguf, tmp_path, tensors, metadata, name):
    path = variant(good_gguf, tmp_path, metadata=metadata, tensors=tensors)
    with pytest.raises(ValueError, match=f"not part of this model.*{re.escape(name)}"):
        LLM(path, n_ctx=16)


def test_float_matrix_bytes_must_fit_its_type_and_shape():
    with pytest.raises(ValueError, match="multiple of 256"):
        FloatMatrix(np.zeros(210, np.uint8), "Q6_K", 1, 128)  # Q6_K blocks are 256 wide
    with pytest.raises(ValueError, match="takes 420 bytes, got 210"):
        FloatMatrix(np.zeros(210, np.uint8), "Q6_K", 2, 256)


# ------------------------------------------------------------------ configuration values

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("key, value", [
    ("block_count", 2**32 - 1), ("block_count", 0), ("attention.head_count", 0),
    ("attention.head_count_kv", 0), ("attention.head_count_kv", 3), ("embedding_length", 0),
    ("feed_forward_length", GGUFValue(-512, ValueType.INT32)), ("context_length", 0),
    ("vocab_size", 301), ("rope.dimension_count", 63),
    ("attention.layer_norm_rms_epsilon", NAN), ("attention.layer_norm_rms_epsilon", INF),
    ("attention.layer_norm_rms_epsilon", -1e-5), ("rope.freq_base", -1.0),
    ("rope.freq_base", NAN), ("rope.freq_base", 0.5),
    # of the wrong type
    ("block_count", "2"), ("attention.head_count", [4, 4]),
    ("attention.layer_norm_rms_epsilon", "1e-5"), ("context_length", True),
])
def test_metadata_values_are_checked(good_gguf, tmp_path, key, value):
    path = variant(good_gguf, tmp_path, metadata={A + key: value})
    with pytest.raises(ValueError, match=re.escape(A + key)):
        LLM(path, n_ctx=16)


def test_a_layer_count_beyond_the_file_is_refused_before_naming_every_layer(good_gguf, tmp_path):
    # 2^24 layers would be 184 million tensor names; the file has 24 tensors
    path = variant(good_gguf, tmp_path, metadata={A + "block_count": 2**24})
    with pytest.raises(ValueError, match=r"lacks 184549354 tensors: blk\.2\.attn_norm"):
        LLM(path, n_ctx=16)


@pytest.mark.parametrize("value", [5, ["bitnet-b1.58"]])
def test_architecture_of_the_wrong_type(good_gguf, tmp_path, value):
    path = variant(good_gguf, tmp_path, metadata={"general.architecture": value})
    with pytest.raises(ValueError, match="unsupported architecture"):
        LLM(path, n_ctx=16)


@pytest.mark.parametrize("key, value", [
    ("tokenizer.ggml.tokens", "abc"),
    ("tokenizer.ggml.token_type", [[1]] * 300),
    ("tokenizer.ggml.bos_token_id", "297"),
    ("tokenizer.ggml.bos_token_id", [297]),
    ("tokenizer.ggml.add_bos_token", "false"),
    ("tokenizer.chat_template", [1, 2]),
    ("tokenizer.ggml.merges", 5),
])
def test_tokenizer_metadata_of_the_wrong_type(good_gguf, tmp_path, key, value):
    path = variant(good_gguf, tmp_path, metadata={key: value})
    with pytest.raises(ValueError, match=re.escape(key)):
        LLM(path, n_ctx=16)


def test_sentencepiece_scores_must_match_the_tokens():
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "a"],
          "tokenizer.ggml.token_type": [2, 3, 3, 1], "tokenizer.ggml.scores": [0.0]}
    with pytest.raises(ValueError, match="tokenizer.ggml.scores"):
        Tokenizer.from_gguf(md)


def test_info_reports_a_bad_file_in_one_line(good_gguf, tmp_path, capsys):
    path = variant(good_gguf, tmp_path, tensors=every_layer("attn_output", "I2_S", (256, 512)))
    assert main(["info", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "integrity: FAILED" in out
    assert err.startswith("tritlm: error: tensor blk.0.attn_output") and err.count("\n") == 1


# --------------------------------------------------------------- Hugging Face directories


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    write_bitnet(directory, "autobitlinear")
    write_tokenizer(directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2]}))
    return directory


def mutated(hf_dir, tmp_path, file: str, change):
    """A copy of `hf_dir` whose `file` holds `change(its JSON value)`, or `change` itself (str
    or bytes)."""
    directory = tmp_path / "model"
    shutil.copytree(hf_dir, directory)
    path = directory / file
    if callable(change):
        change = json.dumps(change(json.loads(path.read_text())))
    path.write_bytes(change if isinstance(change, bytes) else change.encode())
    return directory


def put(*keys_and_value):
    """A change that sets (or with DELETE, deletes) one nested key."""
    *keys, value = keys_and_value

    def change(obj):
        target = obj
        for key in keys[:-1]:
            target = target[key]
        if value is DELETE:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
        return obj
    return change


DELETE = object()

HF_CASES = [
    ("config.json", lambda c: [c], "config.json: not a JSON object"),
    ("config.json", put("hidden_size", DELETE), "config.json lacks hidden_size"),
    ("config.json", put("hidden_size", "128"), "config.json: hidden_size"),
    ("config.json", put("num_attention_heads", 0), "config.json: num_attention_heads"),
    ("config.json", put("num_hidden_layers", 2**40), "config.json: num_hidden_layers"),
    ("config.json", put("rms_norm_eps", NAN), "config.json: rms_norm_eps"),
    ("config.json", put("rope_parameters", "rope_theta", -1), "config.json: rope_parameters.rope_theta"),
    ("config.json", put("rope_parameters", [1]), "config.json: rope_parameters"),
    ("config.json", put("quantization_config", "x"), "config.json: quantization_config"),
    ("config.json", put("hidden_act", "gelu"), "config.json: hidden_act"),
    ("config.json", put("tie_word_embeddings", "yes"), "config.json: tie_word_embeddings"),
    ("tokenizer.json", put("model", "continuing_subword_prefix", "##"),
     "tokenizer.json: model.continuing_subword_prefix"),
    ("tokenizer.json", lambda t: [t], "tokenizer.json must be a mapping"),
    ("tokenizer.json", put("model", "merges", 5), "tokenizer.json: not a tokenizer"),
    ("tokenizer.json", put("model", "vocab", "<|begin_of_text|>", 319), "tokenizer.json: model.vocab"),
    # a model the library builds but cannot encode with (the fuzzer's find)
    ("tokenizer.json", lambda t: t | {"model": {"vocab": []}}, "the tokenizer cannot encode text"),
    # ids the tokenizers library takes, then aborts the process on when encoding (the fuzzer's find)
    ("tokenizer.json", put("model", "vocab", "<|begin_of_text|>", 2**32 - 1), "token ids up to 4294967295"),
    ("tokenizer.json", put("model", "vocab", "<|begin_of_text|>", 2**31), "token ids up to 2147483648"),
    ("tokenizer.json", put("added_tokens", 0, "content", "<|new|>"), "tokenizer.json: token ids up to 320"),
    ("tokenizer.json", b"\xff{}", "tokenizer.json: not UTF-8"),
    ("tokenizer_config.json", lambda c: [c], "tokenizer_config.json must be a mapping"),
    ("tokenizer_config.json", "[" * 100000 + "]" * 100000, "tokenizer_config.json is not valid JSON for tritlm: nested too deeply"),
    ("tokenizer_config.json", "{oops", "tokenizer_config.json is not valid JSON"),
    ("tokenizer_config.json", put("bos_token", 5), "tokenizer_config.json: bos_token"),
    ("tokenizer_config.json", put("bos_token", "<|nope|>"), "tokenizer_config.json: bos_token"),
    ("tokenizer_config.json", put("bos_token", {"content": 5}), "tokenizer_config.json: bos_token"),
    ("tokenizer_config.json", put("add_bos_token", "no"), "tokenizer_config.json: add_bos_token"),
    ("tokenizer_config.json", put("chat_template", [1]), "tokenizer_config.json: chat_template"),
    ("tokenizer_config.json", put("chat_template", 5), "tokenizer_config.json: chat_template"),
    ("generation_config.json", put("eos_token_id", "2"), "generation_config.json: eos_token_id"),
]


@pytest.mark.parametrize("file, change, message", HF_CASES,
                         ids=[f"{c[0]}-{c[2].split(': ')[-1]}-{i}" for i, c in enumerate(HF_CASES)])
def test_hugging_face_files(hf_dir, tmp_path, file, change, message):
    directory = mutated(hf_dir, tmp_path, file, change)
    with pytest.raises(ValueError, match=re.escape(message)):
        LLM(directory, n_ctx=16)


@pytest.mark.parametrize("file", ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
def test_tokenizer_files_may_not_lead_outside_the_directory(hf_dir, tmp_path, file):
    """A tokenizer file that is a symlink out of the model directory (to /etc/passwd, or another
    model's files) is refused, not read."""
    directory = tmp_path / "model"
    shutil.copytree(hf_dir, directory)
    outside = tmp_path / "outside" / file
    outside.parent.mkdir()
    shutil.copy(directory / file, outside) if (directory / file).exists() else outside.write_text("{{ 1 }}")
    (directory / file).unlink(missing_ok=True)
    (directory / file).symlink_to(outside)
    with pytest.raises(ValueError, match="leads outside the model directory"):
        LLM(directory, n_ctx=16)


def test_the_good_directory_loads(hf_dir):
    assert LLM(hf_dir, n_ctx=16).tokenizer.vocab_size == 320


@pytest.mark.parametrize("name, dtype, message", [
    ("model.layers.0.self_attn.q_proj.bias", "float32", "q_proj.bias"),  # a bias tritlm would skip
    ("model.layers.0.input_layernorm.weight", "int32", "dtype I32"),
])
def test_hugging_face_tensors(hf_dir, tmp_path, name, dtype, message):
    import torch
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "model"
    shutil.copytree(hf_dir, directory)
    tensors = load_file(directory / "model.safetensors")
    tensors[name] = torch.ones(128, dtype=getattr(torch, dtype))
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape(message)):
        LLM(directory, n_ctx=16)
