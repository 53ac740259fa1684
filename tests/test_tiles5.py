"""The 1.6-bit layout `tiles5`: its NumPy reference against TQ1_0 (the `gguf` package's quantizer
as the oracle) and every kernel set against the NumPy product of the ternary weights, bit for bit.
"""

import numpy as np
import pytest
from conftest import random_ternary
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tritlm import _native, kernels, quant
from tritlm.quant import layouts

ISAS = kernels.ISAS
settings.register_profile("tiles5", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile("tiles5")


def weights5(ternary, scale=None):
    m = ternary.shape[0]
    scale = np.ones(m, np.float32) if scale is None else np.broadcast_to(np.float32(scale), (m,)).copy()
    return _native.Weights(layouts.pack_tiles5(ternary), m, scale, "tiles5")


def check_product(isa, ternary, x, scale=None, n_threads=2):
    """Sums and outputs of the tiles5 kernels equal the NumPy product of the ternary weights."""
    w = weights5(ternary, scale)
    acts = kernels.quantize_activations(x, isa=isa)
    q, act_scale, row_sum = quant.quantize_activations(x)
    np.testing.assert_array_equal(_native.gemm_sums(w, acts, isa, n_threads), quant.code_sums(ternary, q))
    row_scale = np.ones(ternary.shape[0], np.float32) if scale is None else scale
    np.testing.assert_array_equal(_native.gemm(w, acts, isa, n_threads),
                                  quant.ternary_matmul(ternary, row_scale, q, act_scale, row_sum))


# ----------------------------------------------------------------------------- the byte code

def test_byte_code_is_complete_and_bounded():
    lut = layouts.TILES5_LOOKUP.astype(np.int64)
    x = np.arange(256)
    codes = np.stack([lut[0][x & 63], lut[1][x & 63], lut[2][x >> 2], lut[3][x >> 2],
                      lut[4][x & 63] + lut[5][x >> 2]], axis=1)
    assert codes.max() <= 2  # any byte, even one packing never writes, decodes to codes 0..2
    assert len({tuple(c) for c in codes}) == 243  # every tuple of 5 codes has a byte


def test_native_tables_are_the_reference():
    np.testing.assert_array_equal(np.asarray(_native.TILES5_LOOKUP), layouts.TILES5_LOOKUP)
    assert (_native.TILES5_BLOCK, _native.TILES5_CHUNKS) == (layouts.TILES5_BLOCK, layouts.TILES5_CHUNKS)


# ----------------------------------------------------------------------- NumPy reference

@given(m=st.integers(1, 40), blocks=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(m, blocks, seed):
    ternary = random_ternary(np.random.default_rng(seed), m, 256 * blocks)
    tiles = layouts.pack_tiles5(ternary)
    assert tiles.shape == layouts.tiles5_shape(ternary.shape) == (-(-m // 16), 13 * blocks, 64)
    np.testing.assert_array_equal(layouts.unpack_tiles5(tiles, ternary.shape), ternary)


def test_size_is_52_bytes_per_256_weights(rng):
    ternary = random_ternary(rng, 32, 2560)
    assert layouts.pack_tiles5(ternary).nbytes * 8 / ternary.size == 1.625


def test_byte_order_is_tq1_0s(rng):
    """Chunk i byte 4r + j of a tile holds row r's TQ1_0 byte 4i + j: one weight changed moves
    exactly the byte TQ1_0 keeps it in (column 200 -> byte 40, column 250 -> byte 50)."""
    ternary = np.zeros((16, 256), np.int8)
    base = layouts.pack_tiles5(ternary)
    for column, byte in [(0, 0), (37, 5), (100, 4), (200, 40), (250, 50)]:
        changed = ternary.copy()
        changed[3, column] = 1
        diff = np.argwhere(layouts.pack_tiles5(changed) != base)
        np.testing.assert_array_equal(diff, [[0, byte // 4, 4 * 3 + byte % 4]])


@pytest.mark.parametrize("m,k", [(1, 256), (17, 512), (40, 2560)])
def test_from_tq1_0_bytes(rng, m, k):
    """The byte map from a TQ1_0 tensor, written by the gguf package's quantizer, gives the tiles
    that packing its weights gives."""
    ternary = random_ternary(rng, m, k)
    ternary[0, : k - 256] = 0  # all-zero blocks have scale 0 in the file; the row keeps one other
    scale = rng.uniform(0.1, 2, m).astype(np.float16).astype(np.float32)
    data = gguf_quants.quantize(ternary.astype(np.float32) * scale[:, None], Q.TQ1_0).reshape(-1)
    tiles, row_scale = layouts.tiles5_from_tq1_0(data, (m, k))
    np.testing.assert_array_equal(tiles, layouts.pack_tiles5(ternary))
    np.testing.assert_array_equal(row_scale, scale)
    np.testing.assert_array_equal(layouts.unpack_tiles5(tiles, (m, k)), ternary)


def test_from_tq1_0_rejects_short_data():
    with pytest.raises(ValueError, match="TQ1_0: 53 bytes"):
        layouts.tiles5_from_tq1_0(np.zeros(53, np.uint8), (1, 256))


@pytest.mark.parametrize("call", [lambda t: layouts.pack_tiles5(t),
                                  lambda t: layouts.unpack_tiles5(np.zeros((1, 13, 64), np.uint8), t.shape)])
def test_tiles5_needs_k_multiple_of_256(call):
    with pytest.raises(ValueError, match="multiple of 256"):
        call(np.zeros((4, 384), np.int8))


# ------------------------------------------------------------------------------ kernels

@pytest.mark.parametrize("isa", ISAS)
@given(m=st.integers(1, 70), blocks=st.one_of(st.integers(1, 4), st.sampled_from([10, 27])),
       tokens=st.one_of(st.integers(1, 20), st.integers(21, 40)), seed=st.integers(0, 2**32 - 1))
def test_gemm_matches_reference(isa, m, blocks, tokens, seed):
    rng = np.random.default_rng(seed)
    k = 256 * blocks
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    check_product(isa, random_ternary(rng, m, k), x, rng.uniform(0.01, 2, m).astype(np.float32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 8, 16, 17, 20])
def test_gemm_token_counts(isa, rng, tokens):
    k = 768
    check_product(isa, random_ternary(rng, 45, k), rng.standard_normal((tokens, k)).astype(np.float32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,tokens", [(2560, 1), (333, 3), (33, 17)])
def test_gemm_model_shapes(isa, rng, m, tokens):
    k = 2560
    check_product(isa, random_ternary(rng, m, k), rng.standard_normal((tokens, k)).astype(np.float32),
                  n_threads=3)


@pytest.mark.parametrize("isa", ISAS)
def test_gemm_extreme_activations(isa, rng):
    """Every activation at -128 or +127, and mixes of both, through raw int8 activations."""
    k, m = 1024, 37
    ternary = random_ternary(rng, m, k)
    q = np.stack([np.full(k, -128), np.full(k, 127), rng.choice([-128, 127], k),
                  np.where(np.arange(k) % 2, 127, -128), rng.integers(-128, 128, k)]).astype(np.int8)
    for rows in (q[:1], q[:4], q):  # decode, few and many-token kernels
        acts = kernels.Activations(rows, np.ones(len(rows), np.float32), rows.sum(axis=1, dtype=np.int32))
        np.testing.assert_array_equal(_native.gemm_sums(weights5(ternary), acts, isa, 2),
                                      quant.code_sums(ternary, rows))


@pytest.mark.parametrize("isa", ISAS)
def test_absent_fifth_code_is_skipped(isa, rng):
    """Bytes 48..51 of a block hold 4 weights; whatever their 5th code says, the sums stay."""
    m, k = 20, 512
    ternary = random_ternary(rng, m, k)
    tiles = layouts.pack_tiles5(ternary)
    last = tiles.reshape(tiles.shape[0], -1, 13, 64)[:, :, 12]  # chunk 12 of every block
    codes = layouts._TILES5_CODES[last]
    codes[..., 4] = rng.integers(0, 3, codes.shape[:-1])
    last[...] = layouts._TILES5_ENCODE[codes @ layouts._POWERS3]
    assert (layouts._TILES5_CODES[last][..., 4] != 0).any()
    w = _native.Weights(tiles, m, np.ones(m, np.float32), "tiles5")
    q = rng.integers(-128, 128, (6, k)).astype(np.int8)
    for rows in (q[:1], q[:3], q):  # one token, few, many
        acts = kernels.Activations(rows, np.ones(len(rows), np.float32), rows.sum(axis=1, dtype=np.int32))
        np.testing.assert_array_equal(_native.gemm_sums(w, acts, isa, 1), quant.code_sums(ternary, rows))


@pytest.mark.parametrize("isa", ISAS)
def test_thread_counts_agree(isa, rng):
    ternary = random_ternary(rng, 200, 512)
    acts = kernels.quantize_activations(rng.standard_normal((5, 512)).astype(np.float32), isa=isa)
    w = weights5(ternary)
    one = _native.gemm(w, acts, isa, 1)
    for n in (2, 3, 8, 64):
        np.testing.assert_array_equal(_native.gemm(w, acts, isa, n), one)


def test_same_sums_as_2_bit_tiles(rng):
    ternary = random_ternary(rng, 100, 1280)
    acts = kernels.quantize_activations(rng.standard_normal((7, 1280)).astype(np.float32))
    two = _native.Weights(layouts.pack_tiles(ternary), 100, np.ones(100, np.float32))
    assert two.layout == "tiles" and weights5(ternary).layout == "tiles5"
    np.testing.assert_array_equal(_native.gemm_sums(weights5(ternary), acts, ISAS[0]),
                                  _native.gemm_sums(two, acts, ISAS[0]))


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("tiles,layout,message", [
    (np.zeros((1, 13, 64), np.uint8), "tiles3", "layout must be 'tiles' or 'tiles5'"),
    (np.zeros((1, 14, 64), np.uint8), "tiles5", "multiple of 256"),
    (np.zeros((1, 0, 64), np.uint8), "tiles5", "positive multiple"),
    (np.zeros((2, 13, 64), np.uint8), "tiles5", "tiles: expected shape"),
    (np.zeros((1, 13, 32), np.uint8), "tiles5", "tiles: expected shape"),
    (np.zeros((13, 64), np.uint8), "tiles5", r"expected shape \(tiles, K / 256 \* 13, 64\)"),
    (np.zeros((1, 13 * 1025, 64), np.uint8), "tiles5", "K must be at most"),
])
def test_weights_reject_bad_tiles5(tiles, layout, message):
    with pytest.raises(ValueError, match=message):
        _native.Weights(tiles, 16, np.ones(16, np.float32), layout)
