"""Sampling and the text stream, against direct computations of what each option means."""

import numpy as np
import pytest
from tiny_models import write_tokenizer

from tritlm.generation import TextStream
from tritlm.sampling import Sampler, SamplingParams, _best
from tritlm.tokenizer import Tokenizer


def draws(params, logits, n=400, context=()):
    sampler = Sampler(params)
    return np.array([sampler(logits, list(context)) for _ in range(n)])


def test_greedy_is_argmax(rng):
    logits = rng.standard_normal(50)
    assert draws(SamplingParams(temperature=0), logits, n=3).tolist() == [int(np.argmax(logits))] * 3


def test_top_k_keeps_the_k_best(rng):
    logits = rng.standard_normal(50)
    seen = set(draws(SamplingParams(temperature=5, top_k=3, top_p=1, min_p=0, seed=1), logits))
    assert seen == set(np.argsort(-logits)[:3].tolist())


def test_best_is_a_stable_descending_sort(rng):
    values = rng.integers(0, 20, 3000).astype(np.float64)  # many ties
    for k in (1, 7, 150, 2999, 3000, 5000):
        np.testing.assert_array_equal(_best(values, k), np.argsort(-values, kind="stable")[:k])


def test_top_p_over_many_tokens():
    """Without top-k the nucleus can hold thousands of tokens: the partial sorts must widen to find
    it, ties kept in token order (4000 equal tokens, p = 0.5: the first 2000)."""
    seen = draws(SamplingParams(temperature=1, top_k=0, top_p=0.5, min_p=0, seed=5), np.zeros(4000), n=300)
    assert seen.max() < 2000 and seen.max() > 256


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    seen = set(draws(SamplingParams(temperature=1, top_k=0, top_p=0.75, min_p=0, seed=2), np.log(probs)))
    assert seen == {0, 1}  # 0.5 falls short of 0.75, 0.5 + 0.3 reaches it


def test_min_p_drops_tokens_below_a_share_of_the_best():
    probs = np.array([0.6, 0.3, 0.07, 0.03])
    seen = set(draws(SamplingParams(temperature=1, top_k=0, top_p=1, min_p=0.1, seed=3), np.log(probs)))
    assert seen == {0, 1, 2}  # 0.03 < 0.1 * 0.6


def test_temperature_one_samples_the_softmax():
    probs = np.array([0.7, 0.2, 0.1])
    counts = np.bincount(draws(SamplingParams(temperature=1, top_k=0, top_p=1, min_p=0, seed=4),
                               np.log(probs), n=4000), minlength=3)
    np.testing.assert_allclose(counts / 4000, probs, atol=0.03)


def test_same_seed_same_tokens(rng):
    logits = rng.standard_normal(100)
    a = draws(SamplingParams(seed=7, temperature=1.5), logits, n=20)
    b = draws(SamplingParams(seed=7, temperature=1.5), logits, n=20)
    c = draws(SamplingParams(seed=8, temperature=1.5), logits, n=20)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_penalties_as_defined():
    logits = np.array([2.0, -1.0, 1.5, 0.5])
    context = [0, 0, 1, 3]
    p = SamplingParams(temperature=0, repeat_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    # token 0: 2/2 - 0.5 - 2*0.25 = 0; token 1: -1*2 - 0.75 = -2.75; token 3: 0.25 - 0.75 = -0.5
    expected = np.array([0.0, -2.75, 1.5, -0.5])
    assert Sampler(p)(logits, context) == int(np.argmax(expected)) == 2
    assert Sampler(SamplingParams(temperature=0))(logits, context) == 0  # no penalties: 0 wins


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(min_p=2), dict(top_k=-1),
                                 dict(repeat_penalty=0), dict(presence_penalty=3),
                                 dict(temperature=float("inf")), dict(temperature=float("nan")),
                                 dict(top_p=float("nan")), dict(repeat_penalty=float("inf")),
                                 dict(min_p=float("nan")), dict(frequency_penalty=float("nan")),
                                 dict(seed=1.5), dict(seed="7")])
def test_bad_sampling_parameters(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_any_integer_is_a_seed(rng):
    """OpenAI takes any integer as a seed: negative and huge ones work, and reproducibly (a seed
    is taken modulo 2**64, so -1 is 2**64 - 1)."""
    logits = rng.standard_normal(100)
    wide = dict(temperature=1.5, top_k=0, top_p=1, min_p=0)
    for seed in (-1, -(2**70), 2**64, 2**200):
        a = draws(SamplingParams(seed=seed, **wide), logits, n=20)
        assert a.tolist() == draws(SamplingParams(seed=seed, **wide), logits, n=20).tolist()
    assert draws(SamplingParams(seed=-1, **wide), logits, n=20).tolist() == \
        draws(SamplingParams(seed=2**64 - 1, **wide), logits, n=20).tolist()
    assert draws(SamplingParams(seed=2**64 + 7, **wide), logits, n=20).tolist() == \
        draws(SamplingParams(seed=7, **wide), logits, n=20).tolist()


@pytest.mark.parametrize("temperature", [1e-310, 5e-324, 1e-300, 1e-30])
def test_tiny_temperatures_are_greedy_not_nan(rng, temperature):
    """logits / T overflows for a tiny T; the draw must still be the best token (what a vanishing
    temperature means), whatever the filters, never a NaN probability."""
    logits = rng.standard_normal(300).astype(np.float32)
    logits[17] = 4.0  # a clear best
    for filters in (dict(top_k=0, top_p=1, min_p=0), dict(top_k=40, top_p=0.9, min_p=0.05)):
        assert set(draws(SamplingParams(temperature=temperature, seed=1, **filters), logits, n=20)) == {17}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_hf(write_tokenizer(tmp_path_factory.mktemp("tok")))


def run(stream, ids):
    out = ""
    for i in ids:
        out += stream.push(i)
        if stream.finish_reason:
            break
    return out


def test_stream_reassembles_the_text(tokenizer):
    text = "def fibonacci(n): ☃ 日本語"
    ids = tokenizer.encode(text, add_bos=False)
    stream = TextStream(tokenizer, max_tokens=len(ids))
    assert run(stream, ids) == text == stream.text
    assert stream.finish_reason == "length"


def test_stream_stops_at_stop_string_without_it(tokenizer):
    ids = tokenizer.encode("return fibonacci(n - 1) + fibonacci", add_bos=False)
    stream = TextStream(tokenizer, max_tokens=100, stop=["(n - 1)"])
    assert run(stream, ids) == "return fibonacci"
    assert stream.finish_reason == "stop"


def test_stream_holds_back_a_possible_stop_string(tokenizer):
    ids = tokenizer.encode("the lazy dog", add_bos=False)
    stream = TextStream(tokenizer, max_tokens=100, stop=["dog."])
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == "the lazy "  # "dog" might still become "dog."
    assert stream.finish("length") == "dog"


def test_stream_ends_on_end_of_turn(tokenizer):
    eot = tokenizer.token_to_id("<|eot_id|>")
    ids = tokenizer.encode("The quick", add_bos=False) + [eot] + tokenizer.encode(" fox", add_bos=False)
    stream = TextStream(tokenizer, max_tokens=100)
    assert run(stream, ids) == "The quick" and stream.finish_reason == "stop"


def test_stream_rejects_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="max_tokens"):
        TextStream(tokenizer, max_tokens=0)
    with pytest.raises(ValueError, match="stop strings"):
        TextStream(tokenizer, max_tokens=5, stop=[""])
