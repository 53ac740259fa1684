"""tritlm.LLM and the `tritlm run / info / convert` commands on a tiny model with a tokenizer."""

import numpy as np
import pytest
from tiny_models import write_bitnet, write_tokenizer

from tritlm import LLM
from tritlm.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    write_bitnet(directory, "autobitlinear")
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def gguf_path(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    assert main(["convert", str(model_dir), "-o", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def llm(gguf_path):
    return LLM(gguf_path, n_ctx=128)


def test_hf_directory_and_converted_gguf_agree(model_dir, llm):
    from_hf = LLM(model_dir, n_ctx=128)
    tokens = llm.tokenize("def fibonacci(n):")
    assert tokens == from_hf.tokenize("def fibonacci(n):")
    assert tokens[0] == llm.tokenizer.bos_id
    np.testing.assert_allclose(llm.logits(tokens), from_hf.logits(tokens), rtol=0, atol=1e-2)


def test_tokenize_round_trip(llm):
    text = "The quick brown fox ☃ 日本語"
    assert llm.detokenize(llm.tokenize(text, add_bos=False)) == text


def test_greedy_generation_follows_the_logits(llm):
    prompt = llm.tokenize("def fibonacci")
    text = llm.generate(prompt, max_tokens=12, temperature=0)
    tokens = list(prompt)
    for _ in range(12):  # the oracle: argmax of a fresh full forward at every step
        tokens.append(int(np.argmax(llm.logits(tokens)[-1])))
    assert text == llm.detokenize(tokens[len(prompt):])


def test_seed_reproducibility(llm):
    # the random tiny model has logits ~100 apart: only a high temperature makes sampling random
    wide = dict(max_tokens=16, temperature=100.0, top_k=0, top_p=1.0, min_p=0.0)
    a = llm.generate("The quick", seed=3, **wide)
    b = llm.generate("The quick", seed=3, **wide)
    c = llm.generate("The quick", seed=4, **wide)
    assert a == b and a != c


def test_stream_equals_generate_and_stops(llm):
    full = llm.generate("The quick", max_tokens=20, temperature=0)
    assert "".join(llm.stream("The quick", max_tokens=20, temperature=0)) == full
    stop = full[3:6]
    cut = llm.generate("The quick", max_tokens=20, temperature=0, stop=[stop])
    assert cut == full[: full.index(stop)]


def test_openai_shaped_completions(llm):
    done = llm.create_completion("The quick", max_tokens=8, temperature=0)
    assert done["object"] == "text_completion" and done["choices"][0]["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 8
    assert done["usage"]["prompt_tokens"] == len(llm.tokenize("The quick"))
    chunks = list(llm.create_completion("The quick", max_tokens=8, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == done["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    chat = llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=6, temperature=0)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    # the built-in BitNet-2B4T format, since the tiny model's architecture is bitnet-b1.58
    assert llm.chat_prompt([{"role": "user", "content": "hi"}]) == "<|begin_of_text|>User: hi<|eot_id|>Assistant: "
    pieces = list(llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=6,
                                             temperature=0, stream=True))
    assert pieces[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in pieces) == \
        chat["choices"][0]["message"]["content"]


def test_prompt_longer_than_context(llm):
    with pytest.raises(ValueError, match="context holds 128"):
        llm.generate(list(range(1, 200)), max_tokens=4)


def test_cli_run_prints_the_continuation(gguf_path, llm, capsys):
    assert main(["run", "-m", str(gguf_path), "-p", "The quick", "-n", "10", "-temp", "0", "-c", "128"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == ("The quick" + llm.generate("The quick", max_tokens=10, temperature=0)).strip()
    assert "tokens/s" in err


def test_cli_info_lists_tensors(gguf_path, capsys):
    assert main(["info", str(gguf_path)]) == 0
    out = capsys.readouterr().out
    assert "general.architecture = 'bitnet-b1.58'" in out
    assert any(line.split()[:3] == ["blk.1.ffn_down.weight", "I2_S", "(128,"] for line in out.splitlines())
    assert "loads as bitnet-b1.58" in out


def test_cli_errors(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.gguf")]) == 2
    assert "no such model" in capsys.readouterr().err
    assert main(["convert", str(tmp_path), "-o", str(tmp_path / "x.gguf")]) == 2


def test_cli_conversation(gguf_path, llm, capsys, monkeypatch):
    turns = iter(["hi", "more"])

    def fake_input(prompt):
        try:
            return next(turns)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["run", "-m", str(gguf_path), "-p", "Be brief.", "-cnv", "-n", "6", "-temp", "0", "-c", "128"]) == 0
    out = capsys.readouterr().out
    first = llm.generate(llm.chat_prompt([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "hi"}]), max_tokens=6, temperature=0)
    assert out.splitlines()[0] == first  # the reply to the first turn, in the 2B4T chat format


def test_chat_truncates_the_oldest_turns(llm):
    """A conversation longer than the context keeps its system message and newest turns: as many
    as fit with room for the reply, and one more turn would not have fitted."""
    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": role, "content": f"message number {i} " * 3}
             for i in range(12) for role in ("user", "assistant")][:-1]
    with pytest.raises(ValueError, match="context"):
        llm.create_chat_completion([system, *turns], max_tokens=16)
    reply = llm.create_chat_completion([system, *turns], max_tokens=16, temperature=0, truncate="oldest")
    kept, dropped = llm.fit_chat([system, *turns], 16)
    assert reply["dropped_messages"] == dropped > 0 and kept == [system, *turns[dropped:]]
    assert kept[1]["role"] == "user"
    assert len(llm.tokenize(llm.chat_prompt(kept), special=True)) + 16 <= llm.n_ctx
    one_more = [system, *turns[dropped - 2:]]
    assert len(llm.tokenize(llm.chat_prompt(one_more), special=True)) + 16 > llm.n_ctx
    assert reply["choices"][0]["message"]["content"] == llm.create_chat_completion(
        kept, max_tokens=16, temperature=0)["choices"][0]["message"]["content"]
    with pytest.raises(ValueError, match="last message"):
        llm.fit_chat([system, {"role": "user", "content": "word " * 500}], 16)


def test_weight_layout_and_the_memory_refusal(gguf_path, monkeypatch, capsys):
    from tritlm.runtime import memory

    llm = LLM(gguf_path, weight_layout="tiles")
    assert {m.layout for layer in llm.engine.layers for m in layer.matrices} == {"tiles"}
    with pytest.raises(ValueError, match="weight_layout is the CPU engine's"):
        LLM(gguf_path, weight_layout="tiles", device="cuda")
    monkeypatch.setattr(memory, "available_memory", lambda: 1 << 20)
    with pytest.raises(ValueError, match=r"needs 0\.\d GB, 0\.0 GB available"):
        LLM(gguf_path)
    assert main(["run", "-m", str(gguf_path), "-p", "hi", "-n", "1", "--weight-layout", "tiles"]) == 2
    assert "GB available (0.0 GB of weights in tiles" in capsys.readouterr().err
