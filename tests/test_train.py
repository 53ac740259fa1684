"""tritlm.train: BitLinear computes the engine's arithmetic; a model trained for seconds exports
to GGUF and HF files that tritlm and transformers load with the same outputs and perplexity."""

import json
import os
import sysconfig

import numpy as np
import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from tritlm import LLM  # noqa: E402
from tritlm.cli import main  # noqa: E402
from tritlm.models import reference  # noqa: E402
from tritlm.quant import arithmetic  # noqa: E402
from tritlm.tokenizer import Tokenizer  # noqa: E402
from tritlm.train import (BitLinear, BitNetModel, ModelArgs, TrainOptions, load_checkpoint,  # noqa: E402
                          perplexity, train)
from tritlm.train.export import engine_tensors, model_config  # noqa: E402
from tritlm.train.quant import quantize_activations, ternarize  # noqa: E402

STDLIB = sysconfig.get_paths()["stdlib"]
CORPUS = [os.path.join(STDLIB, "json"), os.path.join(STDLIB, "email")]  # on every machine, offline
TINY = ["--layers", "2", "--hidden", "128", "--ffn", "256", "--heads", "2", "--kv-heads", "1",
        "--vocab-size", "512", "-c", "64", "-b", "8", "--warmup", "5", "-t", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-layer model trained for 40 steps by `tritlm train`, exported to GGUF and HF."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *CORPUS, "--include", "*.py", "-o", str(out), "--steps", "40",
                 "--eval-interval", "20", "--eval-fraction", "0.1", *TINY]) == 0
    model, options = load_checkpoint(out / "checkpoint.pt")
    return out, model, options


def assert_same_logits(actual, expected):
    """Float pipelines (PyTorch, NumPy, the engine, transformers) differ in the last bits of norms
    and attention; where an activation lies that close to an int8 rounding boundary the two round
    differently and later logits move by ~1e-4 of their range (docs/ENGINE.md). So: everything
    within 2e-3 of the range, and most within 1e-5."""
    diff = np.abs(np.asarray(actual) - expected) / np.abs(expected).max()
    assert diff.max() < 2e-3
    assert np.mean(diff < 1e-5) > 0.9


def test_bitlinear_forward_is_the_engine_arithmetic():
    gen = torch.Generator().manual_seed(0)
    layer = BitLinear(256, 96)
    x = torch.randn(3, 5, 256, generator=gen) * torch.logspace(-3, 2, 5)[None, :, None]
    y = layer(x)
    w = layer.weight.detach().numpy()
    q, scale, row_sum = arithmetic.quantize_activations(x.reshape(-1, 256).numpy())
    ternary, gamma = arithmetic.ternarize(w)
    expected = arithmetic.ternary_matmul(ternary, gamma, q, scale, row_sum)
    np.testing.assert_array_equal(y.detach().reshape(-1, 96).numpy(), expected)  # bit for bit
    t, g = layer.quantized()
    np.testing.assert_array_equal(t.numpy(), ternary)
    assert g.item() == gamma


def test_quantizers_round_half_to_even_like_the_reference():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 127.0, 0.0]])  # max 127: scale 1, exact ties
    q, scale = quantize_activations(x)
    ref_q, ref_scale, _ = arithmetic.quantize_activations(x.numpy())
    np.testing.assert_array_equal(q.numpy(), ref_q)
    np.testing.assert_array_equal(scale[:, 0].numpy(), ref_scale)
    w = torch.tensor([[0.5, -0.5, 1.5, 0.0], [2.0, -1.6, 0.0, 0.0]])  # mean|w| = 0.75: W/gamma ties
    t, g = ternarize(w)
    ref_t, ref_g = arithmetic.ternarize(w.numpy())
    np.testing.assert_array_equal(t.numpy(), ref_t)
    assert g.item() == ref_g


def test_straight_through_gradients():
    gen = torch.Generator().manual_seed(1)
    layer = BitLinear(128, 32)
    x = torch.randn(4, 128, generator=gen, requires_grad=True)
    g = torch.randn(4, 32, generator=gen)
    (layer(x) * g).sum().backward()
    # the oracle: gradients of a float linear over the dequantized values
    q, s = quantize_activations(x)
    t, gamma = ternarize(layer.weight)
    xd = (q / s).requires_grad_()
    wd = (t * gamma).requires_grad_()
    (torch.nn.functional.linear(xd, wd) * g).sum().backward()
    torch.testing.assert_close(x.grad, torch.nn.functional.linear(g, wd.detach().t()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, wd.grad, rtol=1e-5, atol=1e-6)


def test_training_lowers_the_held_out_loss(run):
    out, _, _ = run
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [20, 40]
    assert log[-1]["eval_loss"] < np.log(512)  # below a uniform guess over the vocabulary


def test_model_matches_numpy_reference(run):
    _, model, _ = run
    tokens = list(range(3, 67))
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0].numpy()
    expected = reference.forward(model_config(model), engine_tensors(model), np.array(tokens))
    assert_same_logits(logits, expected)


def test_exports_load_in_tritlm_and_transformers(run):
    from transformers import BitNetForCausalLM

    out, model, _ = run
    text = (out / "heldout.txt").read_text()[:400]
    gguf = LLM(out / "model.gguf", n_threads=1, kv_type="f32")
    hf = LLM(out / "hf", n_threads=1, kv_type="f32")
    tokens = gguf.tokenize(text)[:64]
    assert tokens == hf.tokenize(text)[:64]
    assert tokens == Tokenizer.from_hf(out / "tokenizer").encode(text, special=False)[:64]
    with torch.no_grad():
        expected = model(torch.tensor([tokens]))[0].numpy()
    assert_same_logits(gguf.logits(tokens), expected)
    np.testing.assert_array_equal(hf.logits(tokens), gguf.logits(tokens))  # the same numbers, stored twice
    oracle = BitNetForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    torch.nn.Module.float(oracle).eval()  # the embedding is stored as float16
    with torch.no_grad():
        theirs = oracle(torch.tensor([tokens])).logits[0].numpy()
    assert_same_logits(theirs, expected)
    assert len(gguf.generate("def ", max_tokens=8, temperature=0)) > 0


def test_export_is_lossless_in_perplexity(run):
    out, model, _ = run
    text = (out / "heldout.txt").read_text()[:20_000]
    ours, ours_err = perplexity(model, Tokenizer.from_hf(out / "tokenizer"), text, 64)
    engine, engine_err = LLM(out / "model.gguf", n_threads=1).perplexity(text, 64, batch_size=512)
    print(f"held-out perplexity: PyTorch fake-quant {ours:.4f} ± {ours_err:.4f}, "
          f"tritlm GGUF {engine:.4f} ± {engine_err:.4f}")
    assert abs(engine / ours - 1) < 0.005
    assert ours < 512  # trained: better than a uniform guess


def test_resume_continues_the_run(run, tmp_path):
    out, _, _ = run
    resumed = tmp_path / "resumed"
    assert main(["train", *CORPUS, "--include", "*.py", "-o", str(resumed), "--steps", "4",
                 "--eval-interval", "2", *TINY]) == 0
    first = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert main(["train", "--resume", "-o", str(resumed), "--steps", "8"]) == 0
    state = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert first["step"] == 4 and state["step"] == 8
    assert [h["step"] for h in state["history"]] == [2, 4, 6, 8]
    assert not torch.equal(first["model"]["layers.0.mlp.up_proj.weight"],
                           state["model"]["layers.0.mlp.up_proj.weight"])
    assert (resumed / "model.gguf").is_file()


def test_trained_tokenizer(run):
    out, _, _ = run
    tok = Tokenizer.from_hf(out / "tokenizer")
    assert tok.vocab_size == 512
    assert [tok.token_text(i) for i in range(3)] == ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    text = "def f(x):\n    return x ** 2  # ☃ 日本語\n"
    assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert tok.encode(text)[0] == tok.bos_id
    assert "llama" in tok.gguf_metadata()["tokenizer.ggml.pre"]


def test_clear_errors(tmp_path):
    def options(*data, **kw):
        return TrainOptions(data=[str(d) for d in data], out_dir=str(tmp_path / "o"), steps=1, **kw)

    with pytest.raises(ValueError, match="no such file"):
        train(options(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("  \n")
    with pytest.raises(ValueError, match="corpus is empty"):
        train(options(tmp_path / "empty"))
    (tmp_path / "text.txt").write_text("hello world " * 2000)
    with pytest.raises(ValueError, match="too large for this machine's memory"):
        train(options(tmp_path / "text.txt", hidden_size=65536, intermediate_size=262144,
                      n_layers=64, vocab_size=300))
    with pytest.raises(ValueError, match="multiple of 128"):
        ModelArgs(hidden_size=200)
    assert main(["train", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o")]) == 2


def test_cli_help_explains_the_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "two-stage" in text and "default: 4096" in text and "--time-limit" in text


def test_model_shapes_any_size():
    model = BitNetModel(ModelArgs(vocab_size=300, hidden_size=256, intermediate_size=384,
                                  n_layers=1, n_heads=8, n_kv_heads=2, context_length=16))
    assert model(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 16, 300)
    assert sum(p.numel() for p in model.parameters()) == model.args.n_params()


def test_progress_lines_when_stderr_is_no_terminal(tmp_path, capsys, monkeypatch):
    from tritlm.train import trainer

    monkeypatch.setattr(trainer, "LOG_SECONDS", 0.0)  # a line after every step
    assert main(["train", *CORPUS, "--include", "*.py", "-o", str(tmp_path), "--steps", "3",
                 "--eval-interval", "10", *TINY]) == 0
    err = capsys.readouterr().err
    for step in (1, 2, 3):
        assert f"step {step}/3: train loss" in err and "tokens/s" in err
    assert "\r" not in err  # no progress bar redrawn into a log
