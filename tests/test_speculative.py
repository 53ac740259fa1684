"""Speculative decoding (prompt lookup): the proposer, verification and rollback in the engine,
and greedy output identical token for token to plain greedy decoding."""

import numpy as np
import pytest
from tiny_models import write_bitnet, write_tokenizer

from tritlm import LLM
from tritlm.cli import main
from tritlm.generation import TextStream
from tritlm.models import loader
from tritlm.runtime import Engine
from tritlm.sampling import SamplingParams
from tritlm.speculative import LookupProposer

REPEATS = ("def area(width, height):\n    return width * height\n\n"
           "def area(width, height):\n    return width * height\n\n"
           "def area(width, height):\n    return width * height\n\n")
FREE = "import os\n"


# ------------------------------------------------------------------------------- proposer


def test_nothing_to_propose_without_a_repeat():
    assert LookupProposer().propose([1, 2, 3, 4, 5, 6]) == []
    assert LookupProposer().propose([]) == []


def test_proposes_what_followed_the_most_recent_match():
    assert LookupProposer(k=4).propose([1, 2, 3, 4, 5, 1, 2, 3]) == [4, 5, 1, 2]
    assert LookupProposer(k=2).propose([9, 1, 7, 5, 1, 8, 1]) == [8, 1]  # the later 1, not the first
    assert LookupProposer(k=4).propose([1, 2, 3, 4], limit=0) == []
    assert LookupProposer(k=4).propose([5, 6, 7, 5, 6], limit=1) == [7]
    # near the end, fewer than k tokens followed the match
    assert LookupProposer(k=8).propose([1, 2, 3, 1, 2]) == [3, 1, 2]


def test_longer_ngrams_come_first():
    # (2, 3) last followed by 11, but (1, 2, 3) by 10
    context = [1, 2, 3, 10, 9, 2, 3, 11, 1, 2, 3]
    assert LookupProposer(k=1).propose(context) == [10]
    assert LookupProposer(k=1, max_ngram=2).propose(context) == [11]
    assert LookupProposer(k=1, min_ngram=2).propose([4, 5, 6, 4]) == []


def test_the_index_grows_with_the_context():
    proposer, context = LookupProposer(k=2), [1, 2, 3]
    assert proposer.propose(context) == []
    context += [4, 1, 2, 3]
    assert proposer.propose(context) == [4, 1]


def test_k_adapts():
    p = LookupProposer(k=2, k_max=8)
    p.record(2, 2)
    assert p.k == 4
    p.record(4, 4)
    p.record(8, 8)
    assert p.k == 8
    p.record(8, 3)
    assert p.k == 4
    p.record(4, 0)
    assert p.k == 1
    assert (p.proposed, p.accepted) == (26, 17)


def test_a_rejected_single_guess_pauses_proposing():
    p, context = LookupProposer(k=1), [1, 2, 1, 2, 1]
    pauses = []
    for _ in range(3):
        p.record(1, 0)
        pauses.append(0)
        while p.propose(context) == []:
            pauses[-1] += 1
    assert pauses == [1, 2, 4]
    p.record(1, 1)
    p.record(2, 0)  # several guesses rejected: k shrinks, no pause
    assert p.propose(context) == [2]
    p.record(1, 0)  # after an acceptance, the pauses start again from one step
    assert p.propose(context) == [] and p.propose(context) == [2]


# ------------------------------------------------------------------- engine verification


@pytest.fixture(scope="module")
def engine():
    from tritlm.api import default_model_path

    config, tensors, _ = loader.load(default_model_path())
    return Engine(config, tensors, n_ctx=256)


def test_verification_rows_and_rollback(engine):
    """Feeding a token and guesses gives the logits plain decoding would after each; after the
    cache is rolled back past a wrong guess, decoding goes on as if it had never been fed."""
    prompt, truth = [1, 50, 60, 70, 80], [90, 100, 110, 120, 130, 140]
    reference = engine.new_sequence()
    plain = engine.forward([(reference, prompt + truth)], all_logits=True)[0][len(prompt) - 1:]

    seq = engine.new_sequence()
    engine.forward([(seq, prompt)])
    rows = engine.forward([(seq, truth[:2] + [7, 8])], all_logits=True)[0]  # 2 right, 2 wrong
    np.testing.assert_array_equal(rows[:2], plain[1:3])
    seq.truncate(seq.position - 2)
    assert seq.position == len(prompt) + 2
    rest = np.concatenate([engine.forward([(seq, [t])])[0] for t in truth[2:]])
    np.testing.assert_array_equal(rest, plain[3:])


def test_verification_inside_a_batch(engine):
    """One step: a sequence verifying guesses (every row) beside one decoding (its last row)."""
    a, b = engine.new_sequence(), engine.new_sequence()
    engine.forward([(a, [1, 5, 6, 7]), (b, [1, 9])])
    together = engine.forward([(a, [8, 9, 10]), (b, [11])], all_logits=[True, False])
    alone_a, alone_b = engine.new_sequence(), engine.new_sequence()
    want_a = engine.forward([(alone_a, [1, 5, 6, 7, 8, 9, 10])], all_logits=True)[0][-3:]
    want_b = engine.forward([(alone_b, [1, 9, 11])])[0]
    assert together[0].shape == (3, engine.config.vocab_size) and together[1].shape == (1, engine.config.vocab_size)
    np.testing.assert_array_equal(together[0], want_a)
    np.testing.assert_array_equal(together[1], want_b)
    with pytest.raises(ValueError, match="flags"):
        engine.forward([(a, [1])], all_logits=[True, True])


# ------------------------------------------------------------------- greedy equality


def _hf_model(tmp_path_factory, model_type):
    directory = tmp_path_factory.mktemp(model_type)
    write_bitnet(directory, "autobitlinear", model_type=model_type, max_position_embeddings=512)
    write_tokenizer(directory)
    return LLM(directory, n_ctx=512)


@pytest.fixture(scope="module", params=["bundled", "bitnet", "llama"])
def llm(request, tmp_path_factory):
    """The bundled model (bitnet-b1.58) and tiny random BitNet and Llama checkpoints."""
    if request.param == "bundled":
        return LLM(n_ctx=512)
    return _hf_model(tmp_path_factory, request.param)


def _greedy_params():
    return SamplingParams(temperature=0)


def _greedy(llm, prompt, max_tokens, speculative) -> list[int]:
    """Greedy token ids, on past the end-of-text token (for long outputs)."""
    stream = TextStream(llm.tokenizer, max_tokens=max_tokens, stop_ids=set())
    "".join(llm._pieces(prompt, max_tokens, None, _greedy_params(), stream=stream, speculative=speculative))
    return stream.tokens


@pytest.mark.parametrize("prompt", [REPEATS, FREE])
def test_greedy_tokens_are_unchanged(llm, prompt):
    plain = _greedy(llm, prompt, 200, None)
    assert len(plain) == 200
    assert _greedy(llm, prompt, 200, "lookup") == plain
    t = llm.timings
    assert 0 <= t["accepted_tokens"] <= t["proposed_tokens"]
    if prompt == REPEATS:
        assert t["accepted_tokens"] > 0
    # and through the public API, as text
    assert llm.generate(prompt, max_tokens=50, temperature=0, speculative="lookup") == \
        llm.generate(prompt, max_tokens=50, temperature=0)


def test_tokens_are_identical_to_the_end_of_the_context():
    """Token ids (not only text) until the context is full, from a cache with a reused prefix."""
    llm = LLM(n_ctx=160)
    ids = llm.tokenize(REPEATS)
    runs = {}
    for mode in (None, "lookup", None, "lookup"):
        text_stream = TextStream(llm.tokenizer, max_tokens=10_000, stop_ids=set())
        "".join(llm._pieces(ids, 10_000, None, _greedy_params(), stream=text_stream, speculative=mode))
        assert text_stream.finish_reason == "length"
        runs.setdefault(mode, []).append(text_stream.tokens)
    assert runs["lookup"][0] == runs[None][0] == runs["lookup"][1] == runs[None][1]
    assert len(ids) + len(runs[None][0]) == 161  # the last token needs no room in the cache


def test_stops_and_max_tokens_are_unchanged():
    llm = LLM(n_ctx=512)
    for kwargs in ({"max_tokens": 7}, {"max_tokens": 100, "stop": ["height"]}):
        plain = llm.generate(REPEATS, temperature=0, **kwargs)
        assert llm.generate(REPEATS, temperature=0, speculative="lookup", **kwargs) == plain


def test_sampling_falls_back_to_plain_decoding():
    llm = LLM(n_ctx=256)
    plain = llm.generate(REPEATS, max_tokens=40, temperature=0.8, seed=3)
    assert llm.generate(REPEATS, max_tokens=40, temperature=0.8, seed=3, speculative="lookup") == plain
    assert "proposed_tokens" not in llm.timings
    with pytest.raises(ValueError, match="speculative"):
        llm.generate(REPEATS, max_tokens=4, speculative="draft")


def test_cli_lookup(capsys):
    args = ["run", "-p", REPEATS, "-n", "60", "-temp", "0", "-t", "1"]
    assert main(args) == 0
    plain = capsys.readouterr()
    assert main(args + ["--lookup"]) == 0
    fast = capsys.readouterr()
    assert fast.out == plain.out
    assert "guesses accepted" in fast.err and "guesses accepted" not in plain.err


def test_openai_shaped_completions():
    llm = LLM(n_ctx=256)
    for kwargs in ({}, {"speculative": "lookup"}):
        result = llm.create_completion(REPEATS, max_tokens=30, temperature=0, **kwargs)
        chat = llm.create_chat_completion([{"role": "user", "content": REPEATS}], max_tokens=30,
                                          temperature=0, **kwargs)
        if not kwargs:
            plain = result["choices"][0]["text"], chat["choices"][0]["message"]["content"]
    assert (result["choices"][0]["text"], chat["choices"][0]["message"]["content"]) == plain
