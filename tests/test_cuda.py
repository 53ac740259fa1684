"""The GPU engine's kernels and engine, against the NumPy reference and the CPU engine.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set
here before the kernels are compiled), at tiny shapes: the same integer sums and float steps.
With one, the same tests run compiled on the GPU, and the GPU-only tests (CUDA graphs, LLM on
"cuda") run too.
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from tiny_models import relative_error, write_bitnet  # noqa: E402

from tritlm.cuda import kernels as K  # noqa: E402
from tritlm.cuda.engine import CudaEngine, rope_tables  # noqa: E402
from tritlm.bench.dummy import random_embedding  # noqa: E402
from tritlm.models import export, loader, reference  # noqa: E402
from tritlm.models.config import ModelConfig  # noqa: E402
from tritlm.quant import blocks, quantize_activations, ternary_matmul  # noqa: E402
from tritlm.runtime import Engine  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
rng = np.random.default_rng(0)


def dev(a):
    return torch.tensor(np.ascontiguousarray(a), device=DEVICE)  # a copy, never a view of a


def host(t):
    return t.cpu().numpy()


def ternary(m, k):
    return rng.integers(-1, 2, (m, k)).astype(np.int8)


def matrix(t, scale):
    return K.Matrix(K.pack_codes(dev(t) + 1), dev(np.asarray(scale, np.float32)), t.shape)


# --------------------------------------------------------------------------- weight layout

def test_layout_puts_plane_j_of_a_block_in_bits_2j():
    t = ternary(5, 1000)  # K pads to 1024: two blocks
    words = K.pack_codes(dev(t) + 1)
    assert words.shape == (5, 1024 // 16) and words.dtype == torch.int32
    w = host(words).view(np.uint32)
    for row, col in [(0, 0), (1, 31), (2, 32), (3, 511), (4, 512 + 32 * 15 + 7), (4, 999)]:
        block, j, word = col // 512, col % 512 // 32, col % 32
        assert (w[row, block * 32 + word] >> (2 * j)) & 3 == t[row, col] + 1
    assert (host(K.unpack_codes(words, 1024))[:, 1000:] == 1).all()  # the padding: weight 0
    np.testing.assert_array_equal(host(K.unpack_codes(words, 1000)), t + 1)


# ----------------------------------------------------------------------------- activations

def expected_y(q):
    """The GEMV's telescoped activations: q - 4 q[32 columns back] within each 512 block."""
    prev = np.zeros_like(q, dtype=np.int32)
    prev[:, 32:] = q[:, :-32]
    prev[:, np.arange(q.shape[1]) % 512 < 32] = 0
    return q.astype(np.int32) - 4 * prev


def check_activations(act, x, k):
    q, scale, total = quantize_activations(x)
    kp = K.padded_k(k)
    padded = np.zeros((len(x), kp), np.int8)
    padded[:, :k] = q
    np.testing.assert_array_equal(host(act.q), padded)
    np.testing.assert_array_equal(host(act.scale), scale)
    np.testing.assert_array_equal(host(act.sum), total)
    if act.y is not None:
        np.testing.assert_array_equal(host(act.y), expected_y(padded))


@pytest.mark.parametrize("k", [100, 700])
def test_quantize_matches_the_reference(k):
    x = (rng.standard_normal((3, k)) * [[1], [1e-3], [50]]).astype(np.float32)
    check_activations(K.quantize(dev(x), with_y=True), x, k)


def test_quantize_rounds_half_to_even():
    x = np.array([[127, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5] + [0] * 25], np.float32)  # scale 1
    act = K.quantize(dev(x))
    np.testing.assert_array_equal(host(act.q)[0, :7], [127, 0, 2, 2, 0, -2, 126])
    check_activations(act, x, 32)


@pytest.mark.parametrize("k", [96, 600])
def test_norm_then_quantize_matches_the_reference(k):
    x = (rng.standard_normal((4, k)) * 3).astype(np.float32)
    w = (1 + 0.2 * rng.standard_normal(k)).astype(np.float32)
    check_activations(K.quantize(dev(x), dev(w), 1e-5, with_y=True), reference.rms_norm(x, w, 1e-5), k)
    np.testing.assert_array_equal(host(K.rms_norm(dev(x), dev(w), 1e-5)), reference.rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("activation", ["relu2", "silu"])
def test_gated_norm_quantize_matches_the_reference(activation):
    f = 320
    gate_up = rng.standard_normal((3, 2 * f)).astype(np.float32)
    w = (1 + 0.2 * rng.standard_normal(f)).astype(np.float32)
    act = K.quantize(dev(gate_up), dev(w), 1e-6, gated=True, relu2=activation == "relu2", with_y=True)
    expected = reference.rms_norm(reference.gated(gate_up[:, :f], gate_up[:, f:], activation), w, 1e-6)
    if activation == "relu2" or not GPU:
        check_activations(act, expected, f)
    else:  # the GPU's exp is not NumPy's: a rare rounding may land one step away
        q, scale, _ = quantize_activations(expected)
        np.testing.assert_allclose(host(act.scale), scale, rtol=1e-5)
        assert np.abs(host(act.q)[:, :f].astype(int) - q).max() <= 1


# --------------------------------------------------------------------------------- linears

@pytest.mark.parametrize("tokens", [1, 3, 40])
@pytest.mark.parametrize("m, k", [(70, 512), (33, 1100)])
def test_linear_matches_the_reference_bit_for_bit(tokens, m, k):
    t = ternary(m, k)
    scale = rng.uniform(0.01, 2, m).astype(np.float32)
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    q, act_scale, act_sum = quantize_activations(x)
    expected = ternary_matmul(t, scale, q, act_scale, act_sum)
    w = matrix(t, scale)
    for with_y in {tokens == 1, False}:  # one token: the GEMV, and the GEMM too
        act = K.quantize(dev(x), with_y=with_y)
        np.testing.assert_array_equal(host(K.linear(act, w)), expected)
        residual = rng.standard_normal((tokens, m)).astype(np.float32)
        out = dev(residual)
        K.linear(act, w, out=out, accumulate=True)
        np.testing.assert_array_equal(host(out), residual + expected)


@pytest.mark.parametrize("weight", [-1, 1])
def test_linear_largest_sums_are_exact(weight):
    """Every activation at 127 and every weight alike: the largest sums, where the GEMV's
    wrapping products carry most."""
    k = 2048
    t = np.full((16, k), weight, np.int8)
    x = np.ones((1, k), np.float32)
    q, act_scale, act_sum = quantize_activations(x)
    expected = ternary_matmul(t, 1.0, q, act_scale, act_sum)
    w = matrix(t, np.ones(16))
    for with_y in (True, False):
        np.testing.assert_array_equal(host(K.linear(K.quantize(dev(x), with_y=with_y), w)), expected)


# --------------------------------------------------------------- RoPE, KV cache, attention

@pytest.mark.parametrize("kv_type", ["f16", "f32"])
@pytest.mark.parametrize("style", ["neox", "norm"])
def test_rope_cache_and_attention_match_the_reference(kv_type, style):
    hq, hkv, d, n_ctx = 4, 2, 32, 24
    config = ModelConfig("bitnet", 64, hq * d, 64, 1, hq, hkv, n_ctx, 10000.0, 1e-5, rope_style=style)
    cos, sin = (dev(a) for a in rope_tables(config))
    kv_dtype = {"f16": (torch.float16, np.float16), "f32": (torch.float32, np.float32)}[kv_type]
    caches = [torch.zeros((2, 2, n_ctx, hkv, d), dtype=kv_dtype[0], device=DEVICE) for _ in range(2)]
    layer = 1
    # two sequences in one step: 5 new tokens of the first (from position 0), 3 of the second
    # (from position 7, over keys already cached)
    starts, counts = [0, 7], [5, 3]
    old = rng.standard_normal((7, hkv, d)).astype(np.float32)
    for plane, values in ((0, old), (1, old * 0.5)):
        caches[1][layer, plane, :7] = dev(values.astype(kv_dtype[1]))
    qkv = rng.standard_normal((8, (hq + 2 * hkv) * d)).astype(np.float32)
    positions = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, counts)])
    which = np.repeat([0, 1], counts)
    meta = [dev(positions.astype(np.int64)), dev(np.array([caches[i].data_ptr() for i in which], np.int64)),
            dev(np.full(8, n_ctx * hkv * d, np.int64))]
    q = K.rope_and_cache(dev(qkv), *meta, cos, sin, layer, hq, hkv, d, style == "neox", kv_type == "f32")
    out = K.attention(q, *meta, layer, hq, hkv, d, kv_type == "f32")

    split = lambda a, h: a.reshape(len(a), h, d)  # noqa: E731
    q_ref = reference.rope(split(qkv[:, :hq * d], hq), positions, 10000.0, style)
    k_ref = reference.rope(split(qkv[:, hq * d:(hq + hkv) * d], hkv), positions, 10000.0, style)
    v_ref = split(qkv[:, (hq + hkv) * d:], hkv)
    np.testing.assert_allclose(host(q), q_ref.reshape(8, -1), rtol=1e-5, atol=1e-6)
    for i, (s, n) in enumerate(zip(starts, counts)):
        mine = which == i
        cache = host(caches[i][layer].float())
        np.testing.assert_allclose(cache[0, s:s + n], k_ref[mine].astype(kv_dtype[1]), rtol=1e-3, atol=1e-6)
        np.testing.assert_array_equal(cache[1, s:s + n], v_ref[mine].astype(kv_dtype[1]))
        expected = reference.attention(q_ref[mine], cache[0, :s + n], cache[1, :s + n], positions[mine],
                                       q_f16=kv_type == "f16")
        np.testing.assert_allclose(host(out)[mine], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows, d", [(1, 600), (3, 200)])
def test_head_keeps_the_hidden_states_float32(rows, d):
    """One row: float32 products; more: tensor-core dots of two float16 halves of h."""
    h = (rng.standard_normal((rows, d)) * 10).astype(np.float32)
    w = rng.standard_normal((300, d)).astype(np.float16)
    logits = host(K.head(dev(h), dev(w)))
    expected = h.astype(np.float64) @ w.astype(np.float64).T
    assert relative_error(logits, expected) < 1e-6  # float16 hidden states alone: ~1e-4


# ------------------------------------------------------------------------------ the engine

# every family (their head types: F16; Q8_0, the tied embedding quantized)
FAMILIES = [("bitnet", "autobitlinear", {}, "F16"), ("bitnet", "bitlinear", {"hidden_act": "silu"}, "F16"),
            ("llama", "bitlinear", {}, "Q8_0")]
TOKENS = rng.integers(0, 320, 64 if GPU else 8).tolist()  # (the interpreter is slow)


def tiny_gguf(directory, tmp_path_factory, head_type="F16"):
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    export.write_gguf_model(path, *loader.load_hf(directory), ternary_type="I2_S")
    config, tensors, _ = loader.load(path)
    if head_type == "Q8_0":
        tensors["token_embd"] = loader.FloatMatrix(blocks.quantize_q8_0(tensors["token_embd"].to_array()), "Q8_0",
                                                   config.vocab_size, config.hidden_size)
    return config, tensors


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda m: f"{m[0]}-{m[1]}-{m[2].get('hidden_act', '')}")
def model(request, tmp_path_factory):
    model_type, flavour, overrides, head_type = request.param
    directory = write_bitnet(tmp_path_factory.mktemp("hf"), flavour, model_type=model_type, **overrides)
    return tiny_gguf(directory, tmp_path_factory, head_type)


def test_q6_k_head_matches_the_cpu_head(tmp_path_factory):
    """An untied Q6_K head (random blocks), on the CPU engine's own hidden states: the head's
    float16 copy costs a few 1e-4 of max|logit|. (Whole-model logits of a random Q6_K head
    track every flip of a quantized activation, on some tiny models many times over.)"""
    directory = write_bitnet(tmp_path_factory.mktemp("hf"), "autobitlinear", hidden_size=256,
                             intermediate_size=512, tie_word_embeddings=False)
    config, tensors = tiny_gguf(directory, tmp_path_factory)
    data = random_embedding("Q6_K", config.vocab_size, config.hidden_size, np.random.default_rng(1))
    tensors["output"] = loader.FloatMatrix(data.reshape(-1), "Q6_K", config.vocab_size, config.hidden_size)
    cpu = Engine(config, tensors)
    hidden = cpu.hidden_states(cpu.new_sequence(), TOKENS)
    logits = cpu.forward([(cpu.new_sequence(), TOKENS)], all_logits=True)[0]
    gpu = CudaEngine(config, tensors, device=DEVICE)
    assert relative_error(host(K.head(dev(hidden), gpu.head)), logits) < 1e-3


def full_forward(engine, tokens):
    return engine.forward([(engine.new_sequence(), tokens)], all_logits=True)[0]


@pytest.mark.parametrize("kv_type", ["f16", "f32"])
def test_engine_matches_the_cpu_engine(model, kv_type):
    config, tensors = model
    cpu = full_forward(Engine(config, tensors, kv_type=kv_type), TOKENS)
    gpu = full_forward(CudaEngine(config, tensors, kv_type=kv_type, device=DEVICE), TOKENS)
    assert relative_error(gpu, cpu) < 1e-3
    np.testing.assert_array_equal(gpu.argmax(axis=1), cpu.argmax(axis=1))


def test_decoding_batching_and_chunking_agree(model):
    """Token by token (the GEMV, and on a GPU the CUDA graph), several sequences in one step
    and chunked prefill all give the logits of one full forward, to float rounding."""
    config, tensors = model
    engine = CudaEngine(config, tensors, device=DEVICE, prefill_chunk=5)
    full = full_forward(engine, TOKENS)
    seq = engine.new_sequence()
    n = len(TOKENS) if GPU else 3
    steps = np.concatenate([engine.forward([(seq, [t])])[0] for t in TOKENS[:n]])
    assert relative_error(steps, full[:n]) < 1e-4
    a, b = engine.new_sequence(), engine.new_sequence()
    engine.forward([(a, TOKENS[:3])])
    both = engine.forward([(a, TOKENS[3:]), (b, TOKENS)], all_logits=True)
    assert relative_error(both[0], full[3:]) < 1e-4 and relative_error(both[1], full) < 1e-4
    hidden = engine.hidden_states(engine.new_sequence(), TOKENS)
    assert hidden.shape == (len(TOKENS), config.hidden_size)


def test_engine_rejects_a_foreign_sequence(model):
    config, tensors = model
    engine = CudaEngine(config, tensors, device=DEVICE)
    with pytest.raises(ValueError, match="another engine"):
        engine.forward([(Engine(config, tensors).new_sequence(), [1])])


def test_cpu_device_needs_the_interpreter(model, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        CudaEngine(*model, device="cpu")


def test_llm_names_a_device_it_cannot_use():
    from tritlm import LLM

    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        LLM(device="tpu")
    if not GPU:
        with pytest.raises(ValueError, match="no CUDA GPU"):
            LLM(device="cuda")


@gpu_only
def test_cuda_graph_decode_equals_eager_decode(model):
    """Batch 1, and 3 sequences (the graph of 4: one padding row), bit for bit."""
    config, tensors = model
    graphed, eager = (CudaEngine(config, tensors, cuda_graph=g) for g in (True, False))
    ones, threes = [], []
    for engine in (graphed, eager):
        seq = engine.new_sequence()
        ones.append(np.concatenate([engine.forward([(seq, [t])])[0] for t in TOKENS[:16]]))
        seqs = [engine.new_sequence() for _ in range(3)]
        engine.forward([(s, TOKENS[i:i + 5]) for i, s in enumerate(seqs)])
        threes.append(np.concatenate([np.concatenate(engine.forward([(s, [(t + i) % config.vocab_size]) for i, s in enumerate(seqs)]))
                                      for t in TOKENS[:8]]))
    np.testing.assert_array_equal(ones[0], ones[1])
    np.testing.assert_array_equal(threes[0], threes[1])


@gpu_only
def test_llm_on_cuda_generates_what_the_cpu_generates(tmp_path):
    from tritlm import LLM

    cpu, gpu = LLM(), LLM(device="cuda")
    prompt = "def fibonacci(n):"
    assert gpu.generate(prompt, max_tokens=24, temperature=0) == cpu.generate(prompt, max_tokens=24, temperature=0)
