"""The NumPy reference against independent oracles: the `gguf` package for the llama.cpp types,
and element-by-element transcriptions of FORMATS.md for the others."""

import gguf
import numpy as np
import pytest
from conftest import random_ternary
from gguf import quants

from tritlm import quant
from tritlm.quant import layouts

GGUF_TYPES = {"TQ1_0": gguf.GGMLQuantizationType.TQ1_0, "TQ2_0": gguf.GGMLQuantizationType.TQ2_0}


@pytest.mark.parametrize("layout", ["TQ1_0", "TQ2_0"])
def test_tq_pack_matches_gguf_byte_for_byte(rng, layout):
    ternary = random_ternary(rng, 12, 768)
    ternary[3, :256] = 0  # an all-zero block: llama.cpp writes d = 0 there
    ternary[5] = 0  # an all-zero row
    scale = np.float32(0.0123)
    pack, unpack = layouts.FILE_LAYOUTS[layout]
    ours = pack(ternary, scale)
    theirs = quants.quantize(ternary.astype(np.float32) * scale, GGUF_TYPES[layout]).reshape(-1)
    np.testing.assert_array_equal(ours, theirs)
    # and our unpack of their bytes is their dequantization
    back, row_scale = unpack(theirs, ternary.shape)
    dequantized = quants.dequantize(theirs.reshape(12, -1), GGUF_TYPES[layout])
    np.testing.assert_array_equal(back * row_scale[:, None], dequantized)


def test_tq_rejects_varying_block_scales(rng):
    data = quants.quantize(rng.standard_normal((2, 512)).astype(np.float32), GGUF_TYPES["TQ2_0"])
    with pytest.raises(ValueError, match="block scales differ"):
        layouts.unpack_tq2_0(data.reshape(-1), (2, 512))


def test_i2s_layout_element_by_element(rng):
    m, k = 3, 256
    ternary = random_ternary(rng, m, k)
    data = layouts.pack_i2s(ternary, np.float32(0.75))
    assert data.size == m * k // 4 + 32
    flat = ternary.reshape(-1)
    for n in range(m * k):  # element j of block b: byte 32b + j % 32, shift 6 - 2 (j // 32)
        b, j = divmod(n, 128)
        code = (data[32 * b + j % 32] >> (6 - 2 * (j // 32))) & 3
        assert code == flat[n] + 1
    assert data[m * k // 4 : m * k // 4 + 4].view(np.float32)[0] == np.float32(0.75)
    assert not data[m * k // 4 + 4 :].any()


def test_hf_layout_element_by_element(rng):
    m, k = 8, 5
    ternary = random_ternary(rng, m, k)
    packed = layouts.pack_hf(ternary)
    assert packed.shape == (m // 4, k)
    r_count = m // 4
    for i in range(4):
        for r in range(r_count):
            for c in range(k):
                assert (packed[r, c] >> (2 * i)) & 3 == ternary[i * r_count + r, c] + 1


def test_tiles_layout_element_by_element(rng):
    m, k = 19, 32  # two tiles, the second padded
    ternary = random_ternary(rng, m, k)
    tiles = layouts.pack_tiles(ternary)
    assert tiles.shape == (2, 2, 64)
    for row in range(32):
        for col in range(k):
            tile, r = divmod(row, 16)
            s, rest = divmod(col, 16)
            p, j = divmod(rest, 4)
            code = (tiles[tile, s, 4 * r + j] >> (2 * p)) & 3
            assert code == (ternary[row, col] + 1 if row < m else 1)


@pytest.mark.parametrize("layout", list(layouts.FILE_LAYOUTS))
def test_file_layout_round_trip_and_conversion(rng, layout):
    ternary = random_ternary(rng, 6, 512)
    scale = np.float32(0.5)  # exact in f16, so every layout keeps it
    pack, unpack = layouts.FILE_LAYOUTS[layout]
    data = pack(ternary, scale)
    back, row_scale = unpack(data, ternary.shape)
    np.testing.assert_array_equal(back, ternary)
    np.testing.assert_array_equal(row_scale, np.full(6, scale))
    for target in layouts.FILE_LAYOUTS:
        converted = layouts.convert(data, ternary.shape, layout, target)
        np.testing.assert_array_equal(converted, layouts.FILE_LAYOUTS[target][0](ternary, scale))


def test_hf_and_tiles_round_trip(rng):
    ternary = random_ternary(rng, 36, 128)
    np.testing.assert_array_equal(layouts.unpack_hf(layouts.pack_hf(ternary)), ternary)
    np.testing.assert_array_equal(layouts.unpack_tiles(layouts.pack_tiles(ternary), ternary.shape), ternary)


@pytest.mark.parametrize("bad", [
    lambda: layouts.pack_i2s(np.zeros((2, 100), np.int8), 1.0),  # K not a multiple of 128
    lambda: layouts.pack_i2s(np.full((2, 128), 2, np.int8), 1.0),  # not ternary
    lambda: layouts.pack_i2s(np.zeros((2, 128), np.float32), 1.0),  # wrong dtype
    lambda: layouts.pack_i2s(np.zeros((2, 128), np.int8), [1.0, 2.0]),  # two scales
    lambda: layouts.pack_tq2_0(np.zeros((2, 128), np.int8), 1.0),  # K not a multiple of 256
    lambda: layouts.unpack_i2s(np.zeros(10, np.uint8), (2, 128)),  # truncated
    lambda: layouts.unpack_i2s(np.full(96, 0xFF, np.uint8), (2, 128)),  # code 3
    lambda: layouts.pack_hf(np.zeros((6, 4), np.int8)),  # M not a multiple of 4
    lambda: layouts.convert(np.zeros(96, np.uint8), (2, 128), "I2_S", "Q4_0"),
])
def test_layouts_reject_bad_input(bad):
    with pytest.raises(ValueError):
        bad()


def test_quantize_activations_against_scalar_transcription(rng):
    x = (rng.standard_normal((4, 200)) * [[0.01], [1.0], [30.0], [1e4]]).astype(np.float32)
    x[1, 7] = 0.5 * 127 / 3.0  # values near rounding ties
    q, scale, row_sum = quant.quantize_activations(x)
    for i, row in enumerate(x):
        amax = max(1e-5, max(abs(float(v)) for v in row))  # Python floats are doubles
        s = np.float32(127.0 / amax)
        assert scale[i] == s
        expected = [min(127, max(-128, round(float(np.float32(v) * s)))) for v in row]  # half-even
        assert q[i].tolist() == expected
        assert row_sum[i] == sum(expected)


def test_quantize_activations_all_zero_row():
    q, scale, row_sum = quant.quantize_activations(np.zeros((1, 64), np.float32))
    assert scale[0] == np.float32(127 / 1e-5) and not q.any() and row_sum[0] == 0


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_quantize_activations_rejects_non_finite(value):
    x = np.ones((2, 64), np.float32)
    x[1, 3] = value
    with pytest.raises(ValueError, match="NaN or infinity"):
        quant.quantize_activations(x)


def test_ternary_matmul_is_ternary_times_int8(rng):
    ternary = random_ternary(rng, 7, 256)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    q, scale, row_sum = quant.quantize_activations(x)
    exact = np.einsum("mk,nk->nm", ternary.astype(np.int64), q.astype(np.int64))
    np.testing.assert_array_equal(quant.code_sums(ternary, q).astype(np.int64) - row_sum[:, None], exact)
    y = quant.ternary_matmul(ternary, np.float32(0.3), q, scale, row_sum)
    np.testing.assert_allclose(y, exact / scale[:, None] * np.float32(0.3), rtol=1e-6)
    # and the whole thing approximates the float product it stands for
    np.testing.assert_allclose(y, x @ (ternary.T * np.float32(0.3)), atol=0.05 * np.abs(y).max())


def test_ternarize_absmean():
    w = np.array([[0.0, 0.5, -0.5, 1.5, -3.0, 0.25, 1.0, 0.25]], np.float32)
    ternary, gamma = quant.ternarize(w)
    assert gamma == np.float32(np.abs(w.astype(np.float64)).mean())  # 0.875
    expected = np.clip(np.round(w.astype(np.float64) / float(gamma)), -1, 1)  # np.round: half-even
    np.testing.assert_array_equal(ternary, expected)
    assert quant.ternarize(np.zeros((2, 2), np.float32))[1] == np.float32(1e-5)
