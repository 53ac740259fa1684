"""Every C++ kernel set against the NumPy reference, bit for bit."""

import numpy as np
import pytest
from conftest import random_ternary
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tritlm import _native, kernels, quant
from tritlm.quant import layouts

ISAS = kernels.ISAS
settings.register_profile("kernels", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile("kernels")


def test_portable_and_this_machine_isas_present():
    assert ISAS[-1] == "portable"
    assert len(set(ISAS)) == len(ISAS)


@pytest.mark.parametrize("isa", ISAS)
@given(tokens=st.integers(1, 9), k=st.integers(1, 700), seed=st.integers(0, 2**32 - 1),
       magnitude=st.sampled_from([1e-6, 1.0, 1e3, 1e30]))
def test_quantize_matches_reference(isa, tokens, k, seed, magnitude):
    x = (np.random.default_rng(seed).standard_normal((tokens, k)) * magnitude).astype(np.float32)
    acts = kernels.quantize_activations(x, isa=isa, n_threads=2)
    q, scale, row_sum = quant.quantize_activations(x)
    np.testing.assert_array_equal(acts.q, q)
    np.testing.assert_array_equal(acts.scale, scale)
    np.testing.assert_array_equal(acts.row_sum, row_sum)


@pytest.mark.parametrize("isa", ISAS)
def test_quantize_extremes(isa):
    x = np.zeros((4, 256), np.float32)
    x[1] = 5.0  # every activation at +127
    x[2] = np.linspace(-1, 1, 256)
    x[2, 100] = 3e38  # one huge outlier flattens everything else to 0
    x[3, ::2], x[3, 1::2] = 0.5, -0.5  # exact ties after scaling
    acts = kernels.quantize_activations(x, isa=isa)
    q, scale, row_sum = quant.quantize_activations(x)
    np.testing.assert_array_equal(acts.q, q)
    np.testing.assert_array_equal(acts.scale, scale)
    np.testing.assert_array_equal(acts.row_sum, row_sum)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_quantize_rejects_non_finite(isa, value):
    x = np.ones((3, 300), np.float32)
    x[2, 299] = value
    with pytest.raises(ValueError, match="NaN or infinity"):
        kernels.quantize_activations(x, isa=isa)


def check_product(isa, ternary, scale, x, n_threads=2):
    matrix = kernels.TernaryMatrix(ternary, scale)
    acts = kernels.quantize_activations(x, isa=isa)
    q, act_scale, row_sum = quant.quantize_activations(x)
    np.testing.assert_array_equal(matrix.code_sums(acts, isa=isa, n_threads=n_threads),
                                  quant.code_sums(ternary, q))
    np.testing.assert_array_equal(matrix.matmul(acts, isa=isa, n_threads=n_threads),
                                  quant.ternary_matmul(ternary, matrix.scale, q, act_scale, row_sum))


@pytest.mark.parametrize("isa", ISAS)
@given(m=st.integers(1, 80), k_blocks=st.one_of(st.integers(1, 8), st.sampled_from([20, 54, 128])),
       tokens=st.one_of(st.integers(1, 20), st.integers(21, 64)), seed=st.integers(0, 2**32 - 1))
def test_gemm_matches_reference(isa, m, k_blocks, tokens, seed):
    rng = np.random.default_rng(seed)
    k = 128 * k_blocks
    scale = rng.uniform(0.01, 2, m).astype(np.float32)  # per-row scales
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    check_product(isa, random_ternary(rng, m, k), scale, x)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,tokens", [(2560, 1), (333, 17), (17, 64)])
def test_gemm_model_shapes(isa, rng, m, tokens):
    k = 2560
    check_product(isa, random_ternary(rng, m, k), np.float32(0.8),
                  rng.standard_normal((tokens, k)).astype(np.float32), n_threads=3)


def check_layout(isa, rng, layout, m, k, tokens, n_threads):
    """A random product in `layout`: integer sums and outputs against the NumPy reference."""
    ternary = random_ternary(rng, m, k)
    matrix = kernels.TernaryMatrix(ternary, rng.uniform(0.5, 2, m).astype(np.float32), layout)
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    acts = kernels.quantize_activations(x, isa=isa)
    q, act_scale, row_sum = quant.quantize_activations(x)
    np.testing.assert_array_equal(matrix.code_sums(acts, isa=isa, n_threads=n_threads), quant.code_sums(ternary, q))
    np.testing.assert_array_equal(matrix.matmul(acts, isa=isa, n_threads=n_threads),
                                  quant.ternary_matmul(ternary, matrix.scale, q, act_scale, row_sum))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["tiles", "tiles5"])
@pytest.mark.parametrize("tokens", [2, 3, 9, 23])
def test_gemm_many_tiles_per_thread(isa, rng, layout, tokens):
    """One thread's 71 row tiles (the last one short of rows), more than a kernel takes in one
    group, and token counts that split into uneven blocks."""
    check_layout(isa, rng, layout, 16 * 70 + 5, 1280, tokens, n_threads=1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["tiles", "tiles5"])
def test_gemm_tokens_in_several_passes(isa, rng, layout):
    """More tokens than one pass over the tiles keeps in L2 (256 KB of activations: 32 tokens at
    K = 8192) go in passes, the last one short and in uneven blocks."""
    check_layout(isa, rng, layout, 37, 8192, 77, n_threads=2)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["tiles", "tiles5"])
@pytest.mark.parametrize("code,value", [(2, 127), (2, -128), (0, -128), (1, 127)])
@pytest.mark.parametrize("tokens", [1, 3])  # the decode kernel and the GEMM
def test_gemm_largest_sums_are_exact(isa, layout, code, value, tokens):
    k, m = 16384, 5
    ternary = np.full((m, k), code - 1, np.int8)
    q = np.full((tokens, k), value, np.int8)
    acts = kernels.Activations(q, np.ones(tokens, np.float32), q.sum(axis=1, dtype=np.int32))
    matrix = kernels.TernaryMatrix(ternary, 1.0, layout)
    sums = matrix.code_sums(acts, isa=isa)
    np.testing.assert_array_equal(sums, quant.code_sums(ternary, q))
    assert sums[0, 0] == code * value * k  # 2 * 127 * 16384 = 4161536: no int16 anywhere


@pytest.mark.parametrize("isa", ISAS)
def test_gemm_extreme_activations(isa, rng):
    k = 1024
    ternary = random_ternary(rng, 40, k)
    x = np.zeros((4, k), np.float32)
    x[1] = 1.0
    x[2] = -1.0
    x[3] = rng.standard_normal(k)
    x[3, 5] = 1e20
    check_product(isa, ternary, np.float32(0.25), x)


@pytest.mark.parametrize("isa", ISAS)
def test_thread_counts_agree(isa, rng):
    ternary = random_ternary(rng, 200, 512)
    matrix = kernels.TernaryMatrix(ternary, 1.0)
    acts = kernels.quantize_activations(rng.standard_normal((5, 512)).astype(np.float32), isa=isa)
    one = matrix.matmul(acts, isa=isa, n_threads=1)
    for n in (2, 3, 8, 64):
        np.testing.assert_array_equal(matrix.matmul(acts, isa=isa, n_threads=n), one)


@pytest.mark.parametrize("layout", list(layouts.FILE_LAYOUTS))
def test_matrix_from_file_layouts(rng, layout):
    ternary = random_ternary(rng, 24, 512)
    pack, _ = layouts.FILE_LAYOUTS[layout]
    matrix = kernels.TernaryMatrix.from_layout(layout, pack(ternary, np.float32(0.5)), ternary.shape)
    np.testing.assert_array_equal(layouts.unpack_tiles(matrix.tiles, ternary.shape), ternary)
    np.testing.assert_array_equal(matrix.scale, np.full(24, 0.5, np.float32))


def test_stack_packs_mixed_layouts_like_numpy(rng):
    """Parts in every layout, stacked, with row counts that leave tiles shared and padded: the C++
    packer against NumPy's unpack + pack_tiles."""
    k, parts, ternaries, scales = 512, [], [], []
    for layout, rows in (("int8", 5), ("HF", 12), ("I2_S", 19), ("TQ2_0", 8), ("TQ1_0", 3)):
        ternary = random_ternary(rng, rows, k)
        ternary[1, :256] = 0  # an all-zero TQ block has scale 0 in the file
        scale = rng.uniform(0.5, 2, rows).astype(np.float32) if layout != "I2_S" else np.float32(0.25)
        if layout in ("int8", "HF"):  # the scales travel beside the bytes
            data = ternary if layout == "int8" else layouts.pack_hf(ternary).reshape(-1)
            parts.append(kernels.Part(layout, data, ternary.shape, scale))
            ternaries.append(ternary), scales.append(scale)
            continue
        pack, unpack = layouts.FILE_LAYOUTS[layout]
        data = pack(ternary, scale)
        parts.append(kernels.Part(layout, data, ternary.shape))
        expected_ternary, expected_scale = unpack(data, ternary.shape)
        ternaries.append(expected_ternary), scales.append(expected_scale)
    for layout, pack_tiles in (("tiles", layouts.pack_tiles), ("tiles5", layouts.pack_tiles5)):
        for n_threads in (1, 2, 5):
            matrix = kernels.TernaryMatrix.stack(parts, layout, n_threads=n_threads)
            np.testing.assert_array_equal(matrix.tiles, pack_tiles(np.concatenate(ternaries)))
            np.testing.assert_array_equal(matrix.scale, np.concatenate(scales))


@pytest.mark.parametrize("layout, corrupt, message", [
    ("I2_S", lambda d: d.__setitem__(7, 0xFF), "I2_S weights that are not -1, 0 or \\+1"),
    ("TQ2_0", lambda d: d.__setitem__(64, d[64] ^ 1), "TQ2_0 block scales differ within a row"),
    ("TQ1_0", lambda d: d.__setitem__(np.s_[52:54], np.array([-1], np.float16).view(np.uint8)), "TQ1_0 block scales differ"),
    ("int8", lambda d: d.__setitem__((0, 3), 2), "int8 weights that are not"),
    ("HF", lambda d: d.__setitem__(5, 0xC0), "HF weights that are not"),
])
def test_stack_names_the_corrupt_tensor(rng, layout, corrupt, message):
    ternary = random_ternary(rng, 4, 512)
    data = (ternary.copy() if layout == "int8" else layouts.pack_hf(ternary).reshape(-1) if layout == "HF"
            else layouts.FILE_LAYOUTS[layout][0](ternary, np.float32(1)))
    corrupt(data)
    part = kernels.Part(layout, data, ternary.shape, 1.0 if layout in ("int8", "HF") else None, "blk.3.ffn_up")
    with pytest.raises(ValueError, match=f"blk.3.ffn_up: {message}"):
        kernels.TernaryMatrix.stack([part])


def test_stack_rejects_short_data_and_mixed_k(rng):
    data = layouts.pack_i2s(random_ternary(rng, 4, 256), 1.0)
    with pytest.raises(ValueError, match="bytes of I2_S, 4 rows need 288"):
        kernels.TernaryMatrix.stack([kernels.Part("I2_S", data[:-1], (4, 256))])
    with pytest.raises(ValueError, match="one row length K"):
        kernels.TernaryMatrix.stack([kernels.Part("I2_S", data, (4, 256)), kernels.Part("I2_S", data, (2, 512))])


def test_matrix_from_hf(rng):
    ternary = random_ternary(rng, 24, 256)
    matrix = kernels.TernaryMatrix.from_hf(layouts.pack_hf(ternary), 2.0)
    np.testing.assert_array_equal(layouts.unpack_tiles(matrix.tiles, ternary.shape), ternary)


def test_matmul_operator_approximates_float_product(rng):
    ternary = random_ternary(rng, 64, 512)
    matrix = kernels.TernaryMatrix(ternary, 0.02)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    reference = x @ (ternary.astype(np.float32).T * 0.02)
    np.testing.assert_allclose(matrix @ x, reference, atol=0.02 * np.abs(reference).max())


# --------------------------------------------------------------------------- bad input

@pytest.fixture
def parts(rng):
    matrix = kernels.TernaryMatrix(random_ternary(rng, 32, 256), 1.0)
    acts = kernels.quantize_activations(rng.standard_normal((2, 256)).astype(np.float32))
    return matrix, acts


@pytest.mark.parametrize("change,message", [
    (lambda m: {"tiles": m.tiles.view(np.int8)}, "tiles: expected uint8, got int8"),
    (lambda m: {"tiles": m.tiles[:1]}, "tiles: expected shape"),
    (lambda m: {"tiles": m.tiles[:, :, :32]}, "tiles: expected shape"),
    (lambda m: {"tiles": m.tiles[:, ::2]}, "C-contiguous"),
    (lambda m: {"tiles": m.tiles[:, :10]}, "multiple of 128"),
    (lambda m: {"tiles": m.tiles[0]}, "tiles: expected shape"),
    (lambda m: {"row_scale": m.scale[:31]}, "row_scale: expected shape"),
    (lambda m: {"row_scale": m.scale.astype(np.float64)}, "row_scale: expected float32"),
    (lambda m: {"M": 0}, "M must be positive"),
    (lambda m: {"M": 33}, "tiles: expected shape"),
])
def test_weights_reject_bad_arguments(parts, change, message):
    matrix, _ = parts
    args = dict(tiles=matrix.tiles, M=32, row_scale=matrix.scale)
    with pytest.raises(ValueError, match=message):
        _native.Weights(**(args | change(matrix)))


@pytest.mark.parametrize("change,message", [
    (lambda a: {"q": a.q.astype(np.int16)}, "q: expected int8, got int16"),
    (lambda a: {"q": a.q[:, ::2]}, "C-contiguous"),
    (lambda a: {"q": a.q[0]}, "q: expected shape"),
    (lambda a: {"scale": a.scale[:1]}, "scale: expected shape"),
    (lambda a: {"row_sum": a.row_sum.astype(np.int64)}, "row_sum: expected int32"),
])
def test_activations_reject_bad_arguments(parts, change, message):
    _, acts = parts
    args = dict(q=acts.q, scale=acts.scale, row_sum=acts.row_sum)
    with pytest.raises(ValueError, match=message):
        kernels.Activations(**(args | change(acts)))


@pytest.mark.parametrize("call,message", [
    (lambda w, a: _native.gemm(w, _native.quantize(np.ones((1, 128), np.float32), ISAS[0]), ISAS[0]),
     "activations have K=128, weights K=256"),
    (lambda w, a: _native.gemm(w, a, "sse9"), "not available on this CPU"),
    (lambda w, a: _native.gemm_sums(w, a, ISAS[0], 0), "n_threads"),
])
def test_gemm_rejects_mismatches(parts, call, message):
    matrix, acts = parts
    with pytest.raises(ValueError, match=message):
        call(matrix._weights, acts)


def test_weights_reject_huge_k():
    with pytest.raises(ValueError, match="K must be at most"):
        _native.Weights(np.zeros((1, 32768, 64), np.uint8), 16, np.ones(16, np.float32))


@pytest.mark.parametrize("x,message", [
    (np.zeros((2, 64), np.float64), "x: expected float32, got float64"),
    (np.zeros((2, 128), np.float32)[:, ::2], "C-contiguous"),
    (np.zeros((2, 2, 64), np.float32), "x: expected shape"),
])
def test_quantize_rejects_bad_arguments(x, message):
    with pytest.raises(ValueError, match=message):
        kernels.quantize_activations(x)


def test_matrix_rejects_bad_weights():
    with pytest.raises(ValueError, match="multiple of 128"):
        kernels.TernaryMatrix(np.zeros((4, 100), np.int8), 1.0)
    with pytest.raises(ValueError, match="int8"):
        kernels.TernaryMatrix(np.zeros((4, 128), np.float32), 1.0)
    with pytest.raises(ValueError, match="unknown layout"):
        kernels.TernaryMatrix.from_layout("Q4_0", np.zeros(10, np.uint8), (1, 128))


@pytest.mark.parametrize("isa", ISAS)
def test_isa_from_environment(monkeypatch, rng, isa):
    monkeypatch.setenv("TRITLM_ISA", isa)
    assert kernels.default_isa() == isa
    ternary = random_ternary(rng, 20, 256)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    q, scale, row_sum = quant.quantize_activations(x)
    np.testing.assert_array_equal(kernels.TernaryMatrix(ternary, 1.0) @ x,
                                  quant.ternary_matmul(ternary, np.float32(1), q, scale, row_sum))


def test_unknown_isa_from_environment(monkeypatch):
    monkeypatch.setenv("TRITLM_ISA", "neon-on-x86")
    with pytest.raises(ValueError, match="TRITLM_ISA"):
        kernels.default_isa()


def test_read_probe_reads_whole_buffer():
    buffer = _native.empty_streaming(1 << 20)
    assert buffer.ctypes.data % (2 << 20) == 0
    assert _native.read_seconds(buffer, ISAS[0], 2) > 0


# ------------------------------------------------------------------------------- threads

def test_concurrent_callers_get_exact_results(rng):
    from concurrent.futures import ThreadPoolExecutor

    matrices = [random_ternary(rng, 100 + 16 * i, 512) for i in range(4)]
    x = rng.standard_normal((3, 512)).astype(np.float32)
    q, act_scale, row_sum = quant.quantize_activations(x)
    expected = [quant.ternary_matmul(t, np.float32(1), q, act_scale, row_sum) for t in matrices]

    def work(i):
        matrix = kernels.TernaryMatrix(matrices[i], 1.0)
        return all(np.array_equal(matrix.matmul(kernels.quantize_activations(x), n_threads=2), expected[i])
                   for _ in range(50))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(4)))


def test_kernels_release_the_gil(rng):
    import threading
    import time

    matrix = kernels.TernaryMatrix(random_ternary(rng, 2048, 4096), 1.0)
    acts = kernels.quantize_activations(rng.standard_normal((32, 4096)).astype(np.float32))
    window = []

    def call():  # the portable kernel runs ~0.1 s
        start = time.perf_counter()
        matrix.matmul(acts, isa="portable", n_threads=1)
        window.extend([start, time.perf_counter()])

    worker = threading.Thread(target=call)
    ticks = []
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    start, end = window
    inside = np.array([start] + [t for t in ticks if start < t < end] + [end])
    # held, the GIL would stop this thread for the whole call; released, it never waits long
    assert np.diff(inside).max() < 0.25 * (end - start)
