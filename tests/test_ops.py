"""The float ops (tritlm.ops) on every kernel set, against the NumPy reference
(tritlm.models.reference) and, for the weight types, gguf.quants."""

import gguf
import numpy as np
import pytest
from gguf import quants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tritlm import _native, kernels, ops
from tritlm.models import reference

ISAS = kernels.ISAS
settings.register_profile("ops", deadline=None, max_examples=20,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile("ops")
seeds = st.integers(0, 2**32 - 1)


def normal(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ------------------------------------------------------------------------------------ RMSNorm

@pytest.mark.parametrize("isa", ISAS)
@given(tokens=st.integers(1, 20), d=st.one_of(st.integers(1, 300), st.sampled_from([2560, 6912])),
       seed=seeds, magnitude=st.sampled_from([1e-3, 1.0, 1e4]), eps=st.sampled_from([1e-5, 1e-6, 0.0]))
def test_rms_norm_matches_reference(isa, tokens, d, seed, magnitude, eps):
    rng = np.random.default_rng(seed)
    x, w = normal(rng, tokens, d, scale=magnitude), normal(rng, d)
    out = ops.rms_norm(x, w, eps, isa=isa, n_threads=2)
    np.testing.assert_allclose(out, reference.rms_norm(x, w, eps), rtol=1e-6, atol=0)


@pytest.mark.parametrize("isa", ISAS)
def test_rms_norm_non_finite_rows_follow_the_reference(isa, rng):
    # documented: NaN makes its row NaN; inf makes its row 0 with NaN at the infinities
    x = normal(rng, 4, 40)
    x[1, 3] = np.nan
    x[2, 7] = np.inf
    x[3] = 0.0  # 1 / sqrt(0 + eps): finite
    w = normal(rng, 40)
    out = ops.rms_norm(x, w, 1e-5, isa=isa)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(out, reference.rms_norm(x, w, 1e-5))
    assert np.isnan(out[1]).all() and np.isnan(out[2, 7]) and not out[3].any()


def test_rms_norm_one_token():
    x, w = np.arange(1, 9, dtype=np.float32), np.ones(8, np.float32)
    np.testing.assert_allclose(ops.rms_norm(x, w, 1e-5), reference.rms_norm(x[None], w, 1e-5)[0])


# --------------------------------------------------------------------------------------- RoPE

@given(tokens=st.integers(1, 20), heads=st.integers(1, 5), d=st.sampled_from([2, 64, 100, 128]),
       start=st.integers(0, 100000), gaps=st.booleans(), neox=st.booleans(),
       theta=st.sampled_from([10000.0, 500000.0]), seed=seeds)
def test_rope_matches_reference(tokens, heads, d, start, gaps, neox, theta, seed):
    rng = np.random.default_rng(seed)
    x = normal(rng, tokens, heads, d)
    steps = rng.integers(1, 50, tokens) if gaps else np.ones(tokens, np.int64)
    positions = (start + np.cumsum(steps) - steps[0]).astype(np.int32)
    expected = reference.rope(x, positions, theta, "neox" if neox else "norm")
    y = x.copy()
    assert ops.rope(y, positions, theta, neox, n_threads=2) is y  # in place
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6 * np.abs(x).max())


def test_rope_position_zero_is_identity(rng):
    x = normal(rng, 1, 3, 64)
    y = ops.rope(x.copy(), [0], 500000.0, True)
    np.testing.assert_array_equal(y, x)


# ------------------------------------------------------------------------- KV cache, attention

def new_cache(n_ctx, n_kv_heads, d, dtype):
    return np.zeros((n_ctx, n_kv_heads, d), dtype), np.zeros((n_ctx, n_kv_heads, d), dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@given(tokens=st.integers(1, 20), n_kv_heads=st.integers(1, 3), group=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([64, 128, 100]), filled=st.integers(1, 70), extra=st.integers(0, 30),
       query_kind=st.sampled_from(["prefill", "scattered", "last"]), n_threads=st.sampled_from([1, 2, 3]),
       seed=seeds)
def test_attention_matches_reference(isa, dtype, tokens, n_kv_heads, group, d, filled, extra, query_kind,
                                     n_threads, seed):
    rng = np.random.default_rng(seed)
    n_ctx = filled + extra
    k, v = normal(rng, filled, n_kv_heads, d), normal(rng, filled, n_kv_heads, d)
    cache_k, cache_v = new_cache(n_ctx, n_kv_heads, d, dtype)
    split = int(rng.integers(0, filled + 1))  # stored in two calls, like a prompt then decode steps
    ops.store_kv(cache_k, cache_v, k[:split], v[:split], 0, isa=isa)
    ops.store_kv(cache_k, cache_v, k[split:], v[split:], split, isa=isa)
    if query_kind == "prefill":  # the last `tokens` rows
        positions = np.arange(max(0, filled - tokens), filled)
    elif query_kind == "scattered":  # any rows, gaps, repeats, any order
        positions = rng.integers(0, filled, tokens)
    else:
        positions = np.full(1, filled - 1)
    q = normal(rng, len(positions), n_kv_heads * group, d)
    out = ops.attention(q, cache_k, cache_v, positions.astype(np.int32), isa=isa, n_threads=n_threads)
    # the reference on the values the cache holds: f16-rounded k and v for a float16 cache, and
    # q rounded to f16 for q . k against it, as ggml does
    qr, kr, vr = (a.astype(dtype).astype(np.float32) for a in (q, k, v))
    np.testing.assert_allclose(out, reference.attention(qr, kr, vr, positions), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("isa", ISAS)
def test_attention_model_shape_and_thread_counts(isa, rng):
    # 2B4T: 20 query heads over 5 KV heads of 128; thread counts change the work split only
    n_ctx, t = 600, 7
    k, v = normal(rng, 512, 5, 128), normal(rng, 512, 5, 128)
    cache_k, cache_v = new_cache(n_ctx, 5, 128, np.float16)
    ops.store_kv(cache_k, cache_v, k, v, 0, isa=isa)
    q = normal(rng, t, 20, 128, scale=3.0)  # peaked softmax
    positions = np.arange(512 - t, 512, dtype=np.int32)
    one = ops.attention(q, cache_k, cache_v, positions, isa=isa, n_threads=1)
    qr, kr, vr = (a.astype(np.float16).astype(np.float32) for a in (q, k, v))
    np.testing.assert_allclose(one, reference.attention(qr, kr, vr, positions), rtol=1e-5, atol=2e-6)
    for n in (2, 3, 16, 64):
        np.testing.assert_array_equal(ops.attention(q, cache_k, cache_v, positions, isa=isa, n_threads=n), one)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("window", [0, 77])
def test_attention_of_a_prompt_is_each_token_alone(isa, window, rng):
    # a query's arithmetic depends only on its own position, never on the tokens sharing its work
    # item: a prompt gives bit for bit what its tokens give one at a time (speculative decoding's
    # greedy exactness rests on it), across key blocks, on a diagonal and with a sliding window
    n, t = 700, 45
    cache_k, cache_v = new_cache(n, 2, 128, np.float16)
    ops.store_kv(cache_k, cache_v, normal(rng, n, 2, 128), normal(rng, n, 2, 128), 0, isa=isa)
    q = normal(rng, t, 8, 128, scale=2.0)
    positions = np.arange(n - t, n, dtype=np.int32)
    prompt = ops.attention(q, cache_k, cache_v, positions, window=window, isa=isa, n_threads=2)
    alone = [ops.attention(q[i : i + 1], cache_k, cache_v, positions[i : i + 1], window=window, isa=isa, n_threads=1)
             for i in range(t)]
    np.testing.assert_array_equal(prompt, np.concatenate(alone))
    kr, vr = (c.astype(np.float32) for c in (cache_k, cache_v))
    np.testing.assert_allclose(prompt, reference.attention(q, kr, vr, positions, q_f16=True, window=window),
                               rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("isa", ISAS)
def test_attention_first_position_returns_first_value(isa, rng):
    cache_k, cache_v = new_cache(8, 2, 64, np.float32)
    k, v = normal(rng, 1, 2, 64), normal(rng, 1, 2, 64)
    ops.store_kv(cache_k, cache_v, k, v, 0, isa=isa)
    out = ops.attention(normal(rng, 1, 4, 64), cache_k, cache_v, [0], isa=isa)
    np.testing.assert_allclose(out.reshape(4, 64), v[0].repeat(2, axis=0), rtol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_store_kv_writes_only_its_rows(isa, dtype, rng):
    cache_k, cache_v = new_cache(10, 3, 40, dtype)
    cache_k[:], cache_v[:] = 7, 9
    k, v = normal(rng, 4, 3, 40, scale=100), normal(rng, 4, 3, 40)
    ops.store_kv(cache_k, cache_v, k, v, 5, isa=isa)
    np.testing.assert_array_equal(cache_k[5:9], k.astype(dtype))  # f16: round to nearest even
    np.testing.assert_array_equal(cache_v[5:9], v.astype(dtype))
    assert (cache_k[:5] == 7).all() and (cache_k[9:] == 7).all() and (cache_v[9:] == 9).all()


def float_edge_cases():
    """float32 values around every float16 boundary, ties included, plus random bit patterns."""
    special = [0.0, -0.0, 2.0**-25, np.nextafter(2.0**-25, 1), 3 * 2.0**-25, 2.0**-24, 1.5 * 2.0**-24,
               2.0**-14, np.nextafter(2.0**-14, 0), 65504.0, 65519.99, 65520.0, 65536.0, 1e30,
               np.inf, np.nan, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-11 + 2.0**-20, 3e-8, 6e-8]
    special = np.array(special, np.float32)
    bits = np.random.default_rng(5).integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([special, -special, bits])


@pytest.mark.parametrize("isa", ISAS)
def test_store_kv_rounds_like_numpy(isa):
    x = float_edge_cases()
    x = x[: len(x) // 8 * 8].reshape(-1, 2, 4)  # rows of 8: vector chunks and scalar tails
    cache_k, cache_v = new_cache(len(x), 2, 4, np.float16)
    ops.store_kv(cache_k, cache_v, x, x, 0, isa=isa)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(cache_k), nan)
    np.testing.assert_array_equal(cache_k.view(np.uint16)[~nan], expected.view(np.uint16)[~nan])


@pytest.mark.parametrize("call,message", [
    (lambda c: ops.store_kv(*c, np.ones((3, 2, 16), np.float32), np.ones((3, 2, 16), np.float32), 6),
     r"past the cache \(n_ctx=8\)"),
    (lambda c: ops.store_kv(*c, np.ones((1, 2, 16), np.float32), np.ones((1, 2, 16), np.float32), -1),
     "past the cache"),
    (lambda c: ops.store_kv(*c, np.ones((1, 2, 16)), np.ones((1, 2, 16), np.float32), 0),
     "k: expected float32, got float64"),
    (lambda c: ops.store_kv(*c, np.ones((1, 3, 16), np.float32), np.ones((1, 3, 16), np.float32), 0),
     r"k: expected shape \(1, 2, 16\), got \(1, 3, 16\)"),
    (lambda c: ops.store_kv(c[0], c[1][:, :1], np.ones((1, 2, 16), np.float32),
                            np.ones((1, 2, 16), np.float32), 0), "cache_v: expected shape"),
    (lambda c: ops.store_kv(c[0], c[1].astype(np.float32), np.ones((1, 2, 16), np.float32),
                            np.ones((1, 2, 16), np.float32), 0), "cache_v: expected float16, got float32"),
    (lambda c: ops.store_kv(c[0].astype(np.float64), c[1], np.ones((1, 2, 16), np.float32),
                            np.ones((1, 2, 16), np.float32), 0), "cache_k: expected float16 or float32"),
    (lambda c: ops.store_kv(c[0][:, :, ::2], c[1][:, :, ::2], np.ones((1, 2, 8), np.float32),
                            np.ones((1, 2, 8), np.float32), 0), "C-contiguous"),
    (lambda c: ops.store_kv(np.ones((8, 2, 16), np.float16)[:, ::-1], c[1], np.ones((1, 2, 16), np.float32),
                            np.ones((1, 2, 16), np.float32), 0), "C-contiguous"),
    (lambda c: ops.store_kv(read_only(c[0]), c[1], np.ones((1, 2, 16), np.float32),
                            np.ones((1, 2, 16), np.float32), 0), "cache_k: expected a writable array"),
    (lambda c: ops.store_kv([[0.0]], c[1], np.ones((1, 2, 16), np.float32),
                            np.ones((1, 2, 16), np.float32), 0), "cache_k: expected a writable array"),
    (lambda c: ops.attention(np.ones((1, 4, 16), np.float32), *c, [8]), r"positions\[0\]=8 is past the cache"),
    (lambda c: ops.attention(np.ones((2, 4, 16), np.float32), *c, [0, -1]), r"positions\[1\]=-1"),
    (lambda c: ops.attention(np.ones((1, 4, 16), np.float32), *c, [0, 1]), "positions: expected shape"),
    (lambda c: ops.attention(np.ones((1, 4, 16), np.float32), *c, [0.5]), "positions: expected integers"),
    (lambda c: ops.attention(np.ones((1, 3, 16), np.float32), *c, [0]), "do not group"),
    (lambda c: ops.attention(np.ones((1, 4, 32), np.float32), *c, [0]),
     r"q: expected shape \(1, 4, 16\), got \(1, 4, 32\)"),
    (lambda c: ops.attention(np.ones((1, 4, 16), np.float16), *c, [0]), "q: expected float32"),
    (lambda c: ops.attention(np.ones((4, 16), np.float32), *c, [0]), "q: expected 3 dimensions"),
    (lambda c: ops.attention(np.ones((1, 4, 16), np.float32), c[0], c[1][:4], [0]), "cache_v: expected shape"),
    (lambda c: ops.attention(np.ones((1, 4, 16), np.float32), *c, [0], isa="sse9"), "not available"),
    (lambda c: ops.attention(np.ones((1, 4, 16), np.float32), *c, [0], n_threads=-1), "n_threads"),
])
def test_cache_and_attention_reject_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call(new_cache(8, 2, 16, np.float16))


def read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


# ---------------------------------------------------------------------------------- gated FFN

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@given(tokens=st.integers(1, 20), f=st.one_of(st.integers(1, 300), st.just(6912)),
       magnitude=st.sampled_from([0.1, 3.0, 50.0]), seed=seeds)
def test_gated_matches_reference(isa, activation, tokens, f, magnitude, seed):
    rng = np.random.default_rng(seed)
    gate, up = normal(rng, tokens, f, scale=magnitude), normal(rng, tokens, f)
    out = ops.gated(gate, up, activation, isa=isa, n_threads=2)
    with np.errstate(over="ignore"):  # exp(-gate) overflows to inf: silu -> -0, as ours
        expected = reference.gated(gate, up, activation)
    if activation == "relu2":  # the same float32 operations in the same order
        np.testing.assert_array_equal(out, expected)
    else:  # GELU's exponent -2u (~ -20 at g = -5) is a float32 cubic, as in torch: 1e-7 of it is 2e-6 of e^-2u
        np.testing.assert_allclose(out, expected, rtol=1e-5 if activation == "gelu_tanh" else 2e-6, atol=1e-30)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
def test_gated_extremes(isa, activation):
    gate = np.array([[np.nan, 0.0, -0.0, 1e20, -1e20, 100.0, -100.0, 88.0, -88.0, 1e-40, 5.0]], np.float32)
    up = np.ones_like(gate)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = reference.gated(gate, up, activation)
        out = ops.gated(gate, up, activation, isa=isa)
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=1e-30)  # NaN where the reference has NaN
    if activation == "relu2":
        assert out[0, 3] == np.inf  # relu² overflows float16 long before float32: why this is f32


@pytest.mark.parametrize("gate,up,activation,message", [
    (np.ones((2, 8)), np.ones((2, 8), np.float32), "silu", "gate: expected float32, got float64"),
    (np.ones((2, 8), np.float32), np.ones((2, 9), np.float32), "silu", r"up: expected shape \(2, 8\)"),
    (np.ones((2, 8), np.float32), np.ones((2, 8), np.float32), "gelu", "activation must be"),
    (np.ones((2, 16), np.float32)[:, ::2], np.ones((2, 8), np.float32), "relu2", "C-contiguous"),
])
def test_gated_rejects_bad_arguments(gate, up, activation, message):
    with pytest.raises(ValueError, match=message):
        ops.gated(gate, up, activation)


# ------------------------------------------------------------------ LM head, embedding rows

BLOCK = {"F32": 1, "F16": 1, "Q8_0": 32, "Q6_K": 256}


def make_weight(rng, type, vocab, d):
    """(GGUF tensor bytes, the float32 matrix gguf.quants dequantizes them to) for [vocab, d]."""
    w = normal(rng, vocab, d, scale=0.05)
    if type == "F32":
        return w.reshape(-1).view(np.uint8), w
    if type == "F16":
        h = w.astype(np.float16)
        return h.reshape(-1).view(np.uint8), h.astype(np.float32)
    qtype = getattr(gguf.GGMLQuantizationType, type)
    if type == "Q8_0":
        data = quants.quantize(w, qtype)
    else:  # gguf has no Q6_K quantizer: random blocks exercise every bit of the layout
        data = rng.integers(0, 256, (vocab, d // 256, 210), dtype=np.uint8)
        d16 = (rng.uniform(0.5, 2, (vocab, d // 256)) * 1e-3).astype(np.float16)
        data[..., 208:] = d16.view(np.uint8).reshape(vocab, d // 256, 2)
        data = data.reshape(vocab, -1)
    return data.reshape(-1), quants.dequantize(data, qtype).astype(np.float32)


def quantize_int16(x):
    """The quantized head's activations (ops.h quantize_int16): per token, x = dx * q with q the
    int16 nearest x / dx and dx = max |x| / 32767, in float32 as the kernel computes them."""
    m = np.abs(x).max(axis=-1, keepdims=True)
    inv = np.where(m > 0, np.float32(32767) / np.where(m > 0, m, 1), 0).astype(np.float32)
    return np.clip(np.rint(x * inv), -32767, 32767), m / np.float32(32767)


def check_logits(out, x, w, type="F32"):
    """Within float rounding of the exact product, of x as the kernel sees it: float, or for
    the quantized types its int16 quantization."""
    if BLOCK[type] > 1:
        q, dx = quantize_int16(x)
        x = q * dx.astype(np.float64)
    expected = x.astype(np.float64) @ w.T.astype(np.float64)
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64)) + 1e-30
    assert out.shape == expected.shape and out.dtype == np.float32
    assert (np.abs(out - expected) <= bound).all(), np.abs(out - expected).max()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("type", list(BLOCK))
@given(tokens=st.integers(1, 20), vocab=st.integers(1, 70), blocks=st.integers(1, 4), tail=st.integers(0, 40),
       seed=seeds)
def test_head_matmul_matches_dequantized_product(isa, type, tokens, vocab, blocks, tail, seed):
    rng = np.random.default_rng(seed)
    d = blocks * max(BLOCK[type], 64) + (tail if BLOCK[type] == 1 else 0)  # F32/F16: any length
    data, w = make_weight(rng, type, vocab, d)
    x = normal(rng, tokens, d)
    check_logits(ops.head_matmul(x, data, vocab, type, isa=isa, n_threads=2), x, w, type)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("type", list(BLOCK))
def test_head_matmul_model_shape_and_thread_counts(isa, type, rng):
    vocab, d = 1003, 2560  # 2B4T's row length; a vocab that no block size divides
    data, w = make_weight(rng, type, vocab, d)
    for tokens in (1, 6):
        x = normal(rng, tokens, d)
        one = ops.head_matmul(x, data, vocab, type, isa=isa, n_threads=1)
        check_logits(one, x, w, type)
        for n in (2, 3, 64):  # each row is one thread's: the split changes nothing
            np.testing.assert_array_equal(ops.head_matmul(x, data, vocab, type, isa=isa, n_threads=n), one)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("type", list(BLOCK))
def test_embedding_rows_are_exact(isa, type, rng):
    vocab, d = 50, 512
    data, w = make_weight(rng, type, vocab, d)
    ids = np.array([0, 49, 7, 7, 23], np.int32)
    np.testing.assert_array_equal(ops.embedding_rows(data, vocab, d, type, ids, isa=isa), w[ids])


@pytest.mark.parametrize("isa", ISAS)
def test_every_float16_converts_exactly(isa):
    halves = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(256, 256)
    out = ops.embedding_rows(halves, 256, 256, "F16", np.arange(256), isa=isa)
    expected = halves.astype(np.float32)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out[~nan], expected[~nan])


def test_weight_given_as_float_array(rng):
    w = normal(rng, 10, 64)
    x = normal(rng, 2, 64)
    np.testing.assert_array_equal(ops.head_matmul(x, w.astype(np.float16), 10, "F16"),
                                  ops.head_matmul(x, w.astype(np.float16).view(np.uint8), 10, "F16"))
    check_logits(ops.head_matmul(x, w, 10, "F32"), x, w)
    assert ops.weight_nbytes("Q6_K", 10, 512) == 10 * 2 * 210


@pytest.mark.parametrize("call,message", [
    (lambda w: ops.head_matmul(np.ones((1, 64)), w, 4, "F16"), "x: expected float32, got float64"),
    (lambda w: ops.head_matmul(np.ones((1, 128), np.float32)[:, ::2], w, 4, "F16"), "C-contiguous"),
    (lambda w: ops.head_matmul(np.ones((1, 64), np.float32), w[:-2], 4, "F16"), "weight: 510 bytes, but"),
    (lambda w: ops.head_matmul(np.ones((1, 64), np.float32), w, 5, "F16"), "weight: 512 bytes, but"),
    (lambda w: ops.head_matmul(np.ones((1, 64), np.float32), w, 0, "F16"), "vocab must be positive"),
    (lambda w: ops.head_matmul(np.ones((1, 64), np.float32), w, 4, "Q4_0"), "unknown weight type 'Q4_0'"),
    (lambda w: ops.head_matmul(np.ones((1, 48), np.float32), w, 4, "Q8_0"), "not a multiple of 32"),
    (lambda w: ops.head_matmul(np.ones((1, 64), np.float32), w.view(np.float16), 4, "Q8_0"),
     "weight: expected the tensor's bytes"),
    (lambda w: ops.head_matmul(np.ones((1, 64), np.float32), w.reshape(4, -1)[:, ::2], 2, "F16"),
     "weight: must be C-contiguous"),
    (lambda w: ops.embedding_rows(w, 4, 64, "F16", [0, 4]), r"token_ids\[1\]=4 is not below vocab=4"),
    (lambda w: ops.embedding_rows(w, 4, 64, "F16", [-1]), r"token_ids\[0\]=-1"),
    (lambda w: ops.embedding_rows(w, 4, 64, "F16", [[0]]), "token_ids: expected 1 dimensions"),
    (lambda w: ops.embedding_rows(w, 4, 64, "F16", ["a"]), "token_ids: expected integers"),
    (lambda w: ops.embedding_rows(w, 4, 64, "F16", [2**40]), "do not fit in int32"),
    (lambda w: ops.embedding_rows(w, 4, 0, "F16", [0]), "D must be positive"),
])
def test_head_and_embedding_reject_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call(np.zeros(4 * 64 * 2, np.uint8))


@pytest.mark.parametrize("call,message", [
    (lambda: _native.rms_norm(np.ones((2, 8), np.float32), np.ones(7, np.float32), 1e-5, "portable"),
     r"weight: expected shape \(8,\)"),
    (lambda: _native.rms_norm(np.ones((2, 8), np.float32), np.ones(8, np.float32), -1.0, "portable"), "eps"),
    (lambda: _native.rms_norm(np.ones(8, np.float32), np.ones(8, np.float32), 1e-5, "portable"),
     "x: expected 2 dimensions"),
    (lambda: _native.rms_norm([[1.0]], np.ones(8, np.float32), 1e-5, "portable"), "x: expected an array"),
    (lambda: ops.rms_norm(None, np.ones(8, np.float32), 1e-5), "x: expected an array"),
    (lambda: _native.rope(np.ones((2, 1, 8), np.float32), np.zeros(2, np.int64), 1e4, True),
     "positions: expected int32, got int64"),
    (lambda: _native.rope(np.ones((2, 1, 7), np.float32), np.zeros(2, np.int32), 1e4, True), "even"),
    (lambda: _native.rope(np.ones((2, 1, 8), np.float32), np.zeros(2, np.int32), 0.0, True), "theta"),
    (lambda: _native.rope(read_only(np.ones((2, 1, 8), np.float32)), np.zeros(2, np.int32), 1e4, True),
     "x: expected a writable array"),
    (lambda: _native.rope(np.ones((2, 1, 8), np.float64), np.zeros(2, np.int32), 1e4, True),
     "x: expected float32"),
])
def test_norm_and_rope_reject_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_ops_release_the_gil(rng):
    import threading
    import time

    vocab, d = 8192, 2048  # the portable kernel on 16 tokens: ~0.15 s
    data, _ = make_weight(rng, "F16", vocab, d)
    x = normal(rng, 16, d)
    window = []

    def call():
        start = time.perf_counter()
        ops.head_matmul(x, data, vocab, "F16", isa="portable", n_threads=1)
        window.extend([start, time.perf_counter()])

    worker = threading.Thread(target=call)
    ticks = []
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    worker.join()
    start, end = window
    inside = [t for t in ticks if start < t < end]
    # held, the GIL would stop this thread for the whole call; released, it keeps ticking (a
    # shared machine may still pause it now and then)
    assert len(inside) >= 10 and np.diff([start] + inside + [end]).max() < 0.5 * (end - start)
