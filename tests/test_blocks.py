"""quant/blocks.py against the `gguf` package's NumPy code (a transcription of ggml's reference)."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tritlm.quant import blocks


def random_blocks(rng, rows, blocks_per_row, block_bytes, scale_at):
    """Random bytes for every field; the f16 scale is set finite (NaN would not compare)."""
    data = rng.integers(0, 256, (rows * blocks_per_row, block_bytes), dtype=np.uint8)
    d = (rng.standard_normal(rows * blocks_per_row) * 0.1).astype(np.float16)
    data[:, scale_at : scale_at + 2] = d.view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, -1)


def test_q8_0_dequantize_matches_gguf(rng):
    x = rng.standard_normal((5, 96)).astype(np.float32) * np.float32(3.0)
    x[1, :32] = 0  # a zero block
    q = quants.quantize(x, Q.Q8_0)
    ours = blocks.dequantize_q8_0(q.reshape(-1), x.shape)
    np.testing.assert_array_equal(ours, quants.dequantize(q, Q.Q8_0))
    # every bit pattern of q, random scales
    raw = random_blocks(rng, 4, 3, 34, scale_at=0)
    np.testing.assert_array_equal(blocks.dequantize_q8_0(raw.reshape(-1), (4, 96)),
                                  quants.dequantize(raw, Q.Q8_0))


def test_q6_k_dequantize_matches_gguf(rng):
    # gguf has no Q6_K quantizer: random bytes exercise every bit of ql, qh and the scales
    raw = random_blocks(rng, 3, 2, 210, scale_at=208)
    ours = blocks.dequantize_q6_k(raw.reshape(-1), (3, 512))
    np.testing.assert_array_equal(ours, quants.dequantize(raw, Q.Q6_K))
    assert ours.dtype == np.float32 and ours.shape == (3, 512)
    three_d = blocks.dequantize_q6_k(raw.reshape(-1), (3, 2, 256))
    np.testing.assert_array_equal(three_d.reshape(3, 512), ours)


def test_quantize_q8_0_matches_gguf_byte_for_byte(rng):
    x = rng.standard_normal((4, 128)).astype(np.float32) * np.float32(7.0)
    x[0, :32] = 0
    # exact halves after scaling (max 127 -> d = 1): roundf sends them away from zero
    x[1, :32] = np.arange(-15.5, 16.5, 1, dtype=np.float32)
    x[1, 31] = 127
    ours = blocks.quantize_q8_0(x)
    np.testing.assert_array_equal(ours, quants.quantize(x, Q.Q8_0).reshape(-1))
    assert ours.dtype == np.uint8 and ours.shape == (4 * 4 * 34,)


magnitudes = st.one_of(st.just(0.0), st.floats(2.0**-100, 2.0**20, width=32))
signed = st.tuples(magnitudes, st.booleans()).map(lambda t: -t[0] if t[1] else t[0])


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.sampled_from([32, 64])),
                  elements=signed))
def test_quantize_q8_0_property(x):
    np.testing.assert_array_equal(blocks.quantize_q8_0(x), quants.quantize(x, Q.Q8_0).reshape(-1))


def test_f16_and_bf16_widening_match_gguf(rng):
    bits = rng.integers(0, 1 << 16, 4096, dtype=np.uint16)  # every class: NaN, inf, subnormal
    got = blocks.f16_to_f32(bits.view(np.uint8))
    want = quants.dequantize(bits.view(np.uint8).reshape(4, -1), Q.F16).reshape(-1)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    got = blocks.bf16_to_f32(bits.view(np.uint8))
    want = quants.dequantize(bits.view(np.uint8).reshape(4, -1), Q.BF16).reshape(-1)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    # a uint16 array keeps its shape
    assert blocks.bf16_to_f32(bits.reshape(64, 64)).shape == (64, 64)


def test_f32_to_bf16_matches_gguf(rng):
    x = rng.integers(0, 1 << 32, 4096, dtype=np.uint32).view(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, 1.00390625, 1.01171875],
                        np.float32)  # the last two: ties that round down (even) and up
    x = np.concatenate([x, specials])
    want = quants.quantize(x.reshape(1, -1), Q.BF16).reshape(-1).view(np.uint16)
    np.testing.assert_array_equal(blocks.f32_to_bf16(x), want)


@pytest.mark.parametrize("fn, shape, nbytes", [
    (blocks.dequantize_q8_0, (2, 48), 2 * 34),     # row not a multiple of 32
    (blocks.dequantize_q8_0, (2, 64), 4 * 34 - 1),  # one byte short
    (blocks.dequantize_q6_k, (1, 128), 210),       # row not a multiple of 256
    (blocks.dequantize_q6_k, (1, 256), 211),       # one byte too many
])
def test_dequantize_rejects_bad_shapes(fn, shape, nbytes):
    with pytest.raises(ValueError, match="row length|needs"):
        fn(np.zeros(nbytes, np.uint8), shape)


def test_quantize_q8_0_rejects_bad_rows():
    with pytest.raises(ValueError, match="multiple of 32"):
        blocks.quantize_q8_0(np.zeros((2, 40), np.float32))
