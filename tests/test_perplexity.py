"""Perplexity (`LLM.perplexity`, `tritlm perplexity`) against transformers on the same windows,
and the bundled tiny model: it loads, generates and predicts held-out code far better than chance."""

import os
import sysconfig

import numpy as np
import pytest
from tiny_models import CORPUS, transformers_logits, write_bitnet, write_tokenizer

from tritlm import LLM
from tritlm.api import default_model_path, perplexity_windows
from tritlm.cli import main

N_CTX = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    write_bitnet(directory, "autobitlinear")
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, n_threads=1, kv_type="f32")


def oracle_nll(model_dir, llm, text, n_ctx):
    """llama-perplexity's scoring spelled out, on transformers' logits."""
    tokens = llm.tokenize(text)
    nll = []
    for i in range(len(tokens) // n_ctx):
        window = [llm.tokenizer.bos_id] + tokens[i * n_ctx + 1:(i + 1) * n_ctx]
        logits = transformers_logits(model_dir, window).astype(np.float64)
        log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - logits.max(1, keepdims=True)
        for j in range(n_ctx // 2, n_ctx - 1):  # second half: positions n/2 .. n-2 predict the next
            nll.append(-log_probs[j, window[j + 1]])
    return np.array(nll)


def test_perplexity_matches_transformers(model_dir, llm):
    ppl, err = llm.perplexity(CORPUS, N_CTX)
    nll = oracle_nll(model_dir, llm, CORPUS, N_CTX)
    assert len(nll) == (len(llm.tokenize(CORPUS)) // N_CTX) * (N_CTX // 2 - 1)
    # the random tiny model's perplexity is astronomical (logits ~100 apart): compare the mean
    # log-likelihood, to float32 rounding of such logits
    assert np.log(ppl) == pytest.approx(nll.mean(), rel=1e-4)
    assert err == pytest.approx(ppl * nll.std(ddof=1) / np.sqrt(len(nll)), rel=1e-3)


def test_batching_does_not_change_the_result(llm):
    one = llm.perplexity(CORPUS, N_CTX)
    assert llm.perplexity(CORPUS, N_CTX, batch_size=4 * N_CTX) == one
    calls = []
    llm.perplexity(CORPUS, N_CTX, batch_size=8 * N_CTX, progress=lambda *a: calls.append(a))
    windows = len(llm.tokenize(CORPUS)) // N_CTX
    assert [c[0] for c in calls] == list(range(8, windows, 8)) + [windows]
    assert calls[-1][2] == one[0]


def test_windows_start_with_bos():
    windows = perplexity_windows(list(range(10, 30)), 8, bos_id=1)
    assert windows == [[1, *range(11, 18)], [1, *range(19, 26)]]  # the 4 left over are dropped


def test_clear_errors(llm):
    with pytest.raises(ValueError, match="at least one window"):
        llm.perplexity("def f(): pass", N_CTX)
    with pytest.raises(ValueError, match="n_ctx must be between"):
        llm.perplexity(CORPUS, llm.config.context_length + 1)


def test_cli(model_dir, llm, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(CORPUS)
    assert main(["perplexity", "-m", str(model_dir), "-f", str(text), "-c", str(N_CTX), "-t", "1"]) == 0
    out, err = capsys.readouterr()
    ppl, stderr = LLM(model_dir, n_threads=1).perplexity(CORPUS, N_CTX)
    assert out.strip() == f"perplexity: {ppl:.4f} +/- {stderr:.4f}"
    assert "[1/" in err
    assert main(["perplexity", "-m", str(model_dir), "-f", str(tmp_path / "missing.txt")]) == 2


# ------------------------------------------------------------------------- the bundled model


@pytest.fixture(scope="module")
def tiny():
    return LLM(n_threads=1)


def test_bundled_model_is_small_and_loads(tiny):
    assert os.path.getsize(default_model_path()) <= 10 * 2**20
    assert tiny.model_path == default_model_path()
    assert tiny.config.arch == "bitnet-b1.58"


def test_bundled_model_generates(tiny, capsys):
    prompt = tiny.tokenize("def fibonacci(n):")
    text = tiny.generate(prompt, max_tokens=12, temperature=0)
    tokens = list(prompt)
    for _ in range(12):  # greedy: the argmax of a full forward at every step
        tokens.append(int(np.argmax(tiny.logits(tokens)[-1])))
    assert text == tiny.detokenize(tokens[len(prompt):]) and text.strip()
    assert main(["run", "-p", "def fibonacci(n):", "-n", "8", "-temp", "0", "-t", "1"]) == 0
    assert capsys.readouterr().out.startswith("def fibonacci(n):" + text[:4])


def test_bundled_model_predicts_held_out_code(tiny):
    """Files of the standard library held out of its training: far below a uniform guess."""
    listed = os.path.join(os.path.dirname(default_model_path()), "tritlm-tiny-heldout.txt")
    stdlib = sysconfig.get_paths()["stdlib"]
    names = [n.strip() for n in open(listed) if n.strip()]
    texts = [open(os.path.join(stdlib, n), encoding="utf-8").read() for n in names
             if os.path.isfile(os.path.join(stdlib, n))]
    if not texts:
        pytest.skip("none of the held-out files is in this Python's standard library")
    text = "".join(texts)[:12_000]
    ppl, _ = tiny.perplexity(text, 256)
    assert ppl < tiny.config.vocab_size / 20
