"""Speculative decoding (prompt lookup): the proposer, verification and rollback in the engine,
and greedy output identical token for token to plain greedy decoding."""

import math

import numpy as np
import pytest
from tiny_models import write_bitnet, write_tokenizer

from tritlm import LLM
from tritlm.cli import main
from tritlm.generation import TextStream
from tritlm.models import loader
from tritlm.runtime import Engine
from tritlm.sampling import Sampler, SamplingParams, speculative_choice
from tritlm.speculative import LookupProposer, verify

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
    # near the end, fewer than k tokens followed the match: the text goes on repeating with the
    # period from the match to now
    assert LookupProposer(k=8).propose([1, 2, 3, 1, 2]) == [3, 1, 2, 3, 1, 2, 3, 1]
    assert LookupProposer(k=5).propose([4, 0, 0]) == [0, 0, 0, 0, 0]


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


# ---------------------------------------------------------------- exact speculative sampling
# The oracle is the distribution p itself: the speculative sampler's tokens, over many seeded
# draws, must be distributed as p (a chi-square test at a 1e-6 significance level: with fixed
# seeds it cannot flake, and a wrong rule fails it by hundreds of standard deviations).


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """P(a chi-square statistic at least this large) for `counts` drawn from `probs`; cells
    expected fewer than 5 times are lumped together. A token of probability 0 must never come."""
    counts, probs = np.ravel(counts).astype(float), np.ravel(probs)
    assert counts[probs == 0].sum() == 0, "a token of probability 0 was drawn"
    expected = counts.sum() * probs
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    stat = float(((observed - expected) ** 2 / expected).sum())
    if stat == 0:
        return 1.0
    a, x = (len(observed) - 1) / 2, stat / 2  # survival = 1 - P(a, x), the regularized gamma
    term = total = 1 / a
    for n in range(1, 2000):
        term *= x / (a + n)
        total += term
    return 1 - min(1.0, total * math.exp(a * math.log(x) - x - math.lgamma(a)))


def test_the_chi_square_helper():
    assert chi_square_p_value(np.array([50, 50]), np.array([0.5, 0.5])) == pytest.approx(1)
    assert chi_square_p_value(np.array([60, 40]), np.array([0.5, 0.5])) == pytest.approx(0.0455, abs=1e-4)
    assert chi_square_p_value(np.array([10, 30, 60]), np.array([0.2, 0.3, 0.5])) == pytest.approx(0.0302, abs=1e-4)


P = np.array([0.35, 0.25, 0.2, 0.1, 0.06, 0.04, 0.0])  # the last token filtered out (top-k...)
Q = np.array([0.1, 0.4, 0.05, 0.3, 0.0, 0.05, 0.1])


def _draws(choose, p, q, n, seed=0):
    """Counts of the tokens `choose(p, q, guess, rng)` returns, the guess drawn from q (one-hot at
    the guess given as an int)."""
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(p), int)
    for _ in range(n):
        if isinstance(q, int):
            counts[choose(p, None, q, rng)] += 1
        else:
            counts[choose(p, q, int(rng.choice(len(q), p=q)), rng)] += 1
    return counts


@pytest.mark.parametrize("q", [Q, 0, 3, 4, 6], ids=["a draft's q", "likely guess", "unlikely guess",
                                                    "rare guess", "impossible guess"])
def test_speculative_choice_draws_from_p(q):
    assert chi_square_p_value(_draws(speculative_choice, P, q, 20_000), P) > 1e-6


def _from_p_after_a_rejection(p, q, guess, rng):
    """A wrong rule: after a rejection, draw from p (not the residual)."""
    q = np.eye(len(p))[guess] if q is None else q
    return guess if rng.random() < p[guess] / q[guess] else int(rng.choice(len(p), p=p))


@pytest.mark.parametrize("q", [Q, 0])
def test_a_wrong_residual_fails_the_test(q):
    """The test has the power to see a wrong residual: drawing from p after a rejection over-draws
    the guessed token (one-hot q: p(x) + (1 - p(x)) p(x) instead of p(x))."""
    assert chi_square_p_value(_draws(_from_p_after_a_rejection, P, q, 20_000), P) < 1e-12
    assert chi_square_p_value(_draws(speculative_choice, P, q, 20_000), P) > 1e-6


def test_a_rejected_guess_is_never_the_token():
    rng = np.random.default_rng(1)
    for guess in range(6):
        for _ in range(200):
            if rng.random() < 0.5:
                assert speculative_choice(P, None, guess, rng) in range(6)
    p = np.array([0.0, 1.0, 0.0])
    assert all(speculative_choice(p, None, 0, rng) == 1 for _ in range(50))  # p(guess) = 0: always rejected
    assert all(speculative_choice(p, None, 1, rng) == 1 for _ in range(50))  # p(guess) = 1: always accepted


def reference_distribution(logits, context, params: SamplingParams) -> np.ndarray:
    """p over the whole vocabulary, computed plainly (a full sort): penalties over the last
    repeat_last_n tokens, then top-k, min-p and top-p on the unscaled softmax, then temperature."""
    x = np.array(logits, dtype=np.float64)
    recent = context[-params.repeat_last_n:] if params.repeat_last_n else []
    for t in set(recent):
        if params.repeat_penalty != 1:
            x[t] = x[t] / params.repeat_penalty if x[t] > 0 else x[t] * params.repeat_penalty
        x[t] -= params.presence_penalty + params.frequency_penalty * recent.count(t)
    order = np.argsort(-x, kind="stable")[: params.top_k or None]
    probs = np.exp(x[order] - x[order].max())
    probs /= probs.sum()
    kept = probs >= params.min_p * probs.max()
    order, probs = order[kept], probs[kept]
    order = order[: int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1]
    p = np.zeros(len(x))
    p[order] = np.exp((x[order] - x[order].max()) / params.temperature)
    return p / p.sum()


FILTERED = SamplingParams(temperature=0.7, top_k=7, top_p=0.9, min_p=0.05, repeat_penalty=1.3,
                          presence_penalty=0.4, frequency_penalty=0.3, repeat_last_n=4, seed=11)
LOGITS = np.array([[2.0, 1.6, 1.5, 1.2, 0.9, 0.7, 0.5, -0.5, -3.0],   # after the last token
                   [1.0, 1.8, 1.7, 0.4, 1.1, -0.2, 0.3, 0.1, -2.0]])  # after the guess


PLAIN = SamplingParams(temperature=1.2, top_k=0, top_p=1, min_p=0, seed=5)


@pytest.mark.parametrize("params, guess", [(FILTERED, 0), (FILTERED, 4), (FILTERED, 8), (PLAIN, 2)],
                         ids=["filtered, likely guess", "filtered, unlikely guess", "filtered-out guess", "plain"])
def test_two_tokens_are_drawn_as_plain_sampling_draws_them(params, guess):
    """The joint distribution of the next two tokens, with a guess of the first verified in the
    same step: p(t1) p(t2 | t1), each token's p with the penalties of the context including the
    tokens before it (the guess, once accepted), the filters and the temperature."""
    context = [3, 0, 3, 6]  # penalised: 3 twice, 0 and 6 once
    vocab = LOGITS.shape[1]
    first = reference_distribution(LOGITS[0], context, params)
    want = np.array([first[a] * reference_distribution(LOGITS[1], context + [a], params) for a in range(vocab)])
    sampler = Sampler(params)
    counts = np.zeros((vocab, vocab), int)
    for _ in range(6000):
        grown = list(context)
        chosen = verify(sampler, LOGITS, [guess], grown)  # [guess, bonus] or [another token]
        if len(chosen) == 1:  # rejected: the next step samples after the token chosen
            verify(sampler, LOGITS[1:], [], grown)
        counts[grown[-2], grown[-1]] += 1
    assert chi_square_p_value(counts, want) > 1e-6


def test_greedy_verification_is_the_argmax():
    sampler, context = Sampler(SamplingParams(temperature=0, repeat_penalty=1.5)), [0, 0]
    best = [int(np.argmax(reference_distribution(row, context, SamplingParams(temperature=1, top_k=0, top_p=1,
                                                                               min_p=0, repeat_penalty=1.5))))
            for row in LOGITS]
    assert verify(sampler, LOGITS, [best[0]], list(context)) == best[:1] + [
        int(np.argmax(reference_distribution(LOGITS[1], context + best[:1], SamplingParams(
            temperature=1, top_k=0, top_p=1, min_p=0, repeat_penalty=1.5))))]
    assert verify(sampler, LOGITS, [7], list(context)) == best[:1]


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
    "".join(llm._pieces(prompt, stream, _greedy_params(), speculative))
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
        "".join(llm._pieces(ids, text_stream, _greedy_params(), mode))
        assert text_stream.finish_reason == "length"
        runs.setdefault(mode, []).append(text_stream.tokens)
    assert runs["lookup"][0] == runs[None][0] == runs["lookup"][1] == runs[None][1]
    assert len(ids) + len(runs[None][0]) == 161  # the last token needs no room in the cache


def test_stops_and_max_tokens_are_unchanged():
    llm = LLM(n_ctx=512)
    for kwargs in ({"max_tokens": 7}, {"max_tokens": 100, "stop": ["height"]}):
        plain = llm.generate(REPEATS, temperature=0, **kwargs)
        assert llm.generate(REPEATS, temperature=0, speculative="lookup", **kwargs) == plain


def test_seeded_speculative_sampling_is_reproducible():
    llm = LLM(n_ctx=256)
    args = dict(max_tokens=60, temperature=0.8, speculative="lookup")  # top-k, top-p, min-p: the defaults
    first = llm.generate(REPEATS, seed=3, **args)
    assert llm.timings["accepted_tokens"] > 0  # sampling too uses the guesses
    assert llm.generate(REPEATS, seed=3, **args) == first
    with pytest.raises(ValueError, match="speculative"):
        llm.generate(REPEATS, max_tokens=4, speculative="medium")
    with pytest.raises(ValueError, match="draft model"):
        llm.generate(REPEATS, max_tokens=4, speculative="draft")
    with pytest.raises(ValueError, match="max_guesses"):
        llm.generate(REPEATS, max_tokens=4, speculative="lookup", max_guesses=0)


def test_cli_lookup(capsys):
    args = ["run", "-p", REPEATS, "-n", "60", "-temp", "0", "-t", "1"]
    assert main(args) == 0
    plain = capsys.readouterr()
    for lookup in (["--lookup"], ["--lookup", "3"]):
        assert main(args + lookup) == 0
        fast = capsys.readouterr()
        assert fast.out == plain.out
        assert "guesses accepted" in fast.err and "guesses accepted" not in plain.err


# -------------------------------------------------------------------------- draft models


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny random BitNet model, and a smaller, different one with the same tokenizer."""
    target, other = tmp_path_factory.mktemp("target"), tmp_path_factory.mktemp("draft")
    write_bitnet(target, "autobitlinear", max_position_embeddings=512)
    write_bitnet(other, "autobitlinear", seed=1, num_hidden_layers=1, tie_word_embeddings=False,
                 max_position_embeddings=512)
    for d in (target, other):
        write_tokenizer(d)
    return target, other


@pytest.mark.parametrize("which", ["itself", "another model"])
def test_a_draft_model_keeps_greedy_tokens(tiny_dirs, which):
    target, other = tiny_dirs
    llm = LLM(target, n_ctx=512, draft_model=target if which == "itself" else other)
    plain = _greedy(llm, REPEATS, 150, None)
    assert _greedy(llm, REPEATS, 150, "draft") == plain
    t = llm.timings
    if which == "itself":  # the draft computes the very same logits: every guess is accepted
        assert t["accepted_tokens"] == t["proposed_tokens"] > 100
    else:
        assert 0 <= t["accepted_tokens"] < t["proposed_tokens"]
    # and again, the draft's cache now holding another text: rewound, as the target's is
    assert _greedy(llm, FREE, 60, "draft") == _greedy(llm, FREE, 60, None)
    assert _greedy(llm, REPEATS, 150, "draft") == plain


def test_a_draft_model_samples_reproducibly(tiny_dirs):
    target, other = tiny_dirs
    llm = LLM(target, n_ctx=512, draft_model=LLM(other, n_ctx=512))
    args = dict(max_tokens=40, temperature=1.5, top_k=0, top_p=1, min_p=0, seed=9, speculative="draft")
    assert llm.generate(REPEATS, **args) == llm.generate(REPEATS, **args)
    assert llm.timings["proposed_tokens"] > 0


def test_a_draft_model_needs_the_same_tokenizer(tiny_dirs):
    from types import SimpleNamespace

    from tritlm.api import check_draft

    target, _ = tiny_dirs
    with pytest.raises(ValueError, match="same tokenizer"):
        LLM(target, n_ctx=256, draft_model=LLM(n_ctx=256))  # the bundled model's vocabulary
    llm = LLM(target, n_ctx=256)
    tok = llm.tokenizer

    class Renamed:  # token 5 spelt otherwise
        def __getattr__(self, name):
            return getattr(tok, name)

        def token_bytes(self, t):
            return b"?" if t == 5 else tok.token_bytes(t)
    with pytest.raises(ValueError, match="token 5"):
        check_draft(llm, SimpleNamespace(config=llm.config, tokenizer=Renamed()))
    check_draft(llm, llm)


def test_cli_draft(tiny_dirs, capsys):
    target, other = tiny_dirs
    args = ["run", "-m", str(target), "-p", REPEATS, "-n", "40", "-temp", "0", "-t", "1", "-c", "256"]
    assert main(args) == 0
    plain = capsys.readouterr()
    assert main(args + ["--draft", str(other)]) == 0
    fast = capsys.readouterr()
    assert fast.out == plain.out and "guesses accepted" in fast.err
    with pytest.raises(SystemExit):  # one or the other
        main(args + ["--draft", str(other), "--lookup", "2"])


def test_openai_shaped_completions():
    llm = LLM(n_ctx=256)
    for kwargs in ({}, {"speculative": "lookup"}):
        result = llm.create_completion(REPEATS, max_tokens=30, temperature=0, **kwargs)
        chat = llm.create_chat_completion([{"role": "user", "content": REPEATS}], max_tokens=30,
                                          temperature=0, **kwargs)
        if not kwargs:
            plain = result["choices"][0]["text"], chat["choices"][0]["message"]["content"]
    assert (result["choices"][0]["text"], chat["choices"][0]["message"]["content"]) == plain
