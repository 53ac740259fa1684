"""Reference vectors for tests/native/aarch64_kernels.cpp, written on the x86 host.

- kernels: ternary weights, float activations and what the NumPy reference (tritlm.quant) makes
  of them: the int8 activations, scales, row sums, the exact code sums and the float products;
- ops: inputs of the float ops (RMSNorm, gated activations, LM heads F16 / Q8_0 / Q6_K,
  attention over f16 and f32 caches, f16 cache rows) and what this machine's native ops compute:
  with the best x86 set (fused multiply-adds: the aarch64 NEON ops must give the same bits) and
  with the portable set (the aarch64 portable ops must give its bits).

File: per array, u16 name length, name, u8 dtype (f: f32, i: i32, b: i8, B: u8, H: u16), u8 ndim,
int64 shape, the raw little-endian bytes.

    python tests/native/make_vectors.py OUT
"""

import struct
import sys

import numpy as np

from tritlm import _native, kernels, ops, quant
from tritlm.quant import blocks

CODES = {np.float32: "f", np.int32: "i", np.int8: "b", np.uint8: "B", np.uint16: "H"}


def put(f, name, a):
    a = np.ascontiguousarray(a)
    f.write(struct.pack("<H", len(name)) + name.encode())
    f.write(struct.pack("<cB", CODES[a.dtype.type].encode(), a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape))
    f.write(a.tobytes())


def kernel_cases(rng):
    """(name, ternary [M, K], row scales [M], activations [T, K])."""
    cases = []
    for i, (m, k, t) in enumerate([(37, 384, 5), (16 * 3 + 7, 2560, 17), (16, 128, 1), (81, 16384, 2), (3, 1280, 64)]):
        x = (rng.standard_normal((t, k)) * 10.0 ** rng.integers(-6, 6, (t, 1))).astype(np.float32)
        cases.append((f"random{i}", rng.integers(-1, 2, (m, k)).astype(np.int8),
                      rng.uniform(0.01, 2, m).astype(np.float32), x))
    k = 1024  # tests/test_kernels.py's extreme activations and quantizer extremes
    x = np.zeros((8, k), np.float32)
    x[1], x[2] = 1.0, -1.0
    x[3] = rng.standard_normal(k)
    x[3, 5] = 1e20
    x[4] = 5.0
    x[5] = np.linspace(-1, 1, k)
    x[5, 100] = 3e38
    x[6, ::2], x[6, 1::2] = 0.5, -0.5
    x[7] = rng.standard_normal(k) * 1e-30
    cases.append(("extreme", rng.integers(-1, 2, (40, k)).astype(np.int8), np.float32(0.25) * np.ones(40, np.float32), x))
    return cases


def write_kernels(f, rng):
    cases = kernel_cases(rng)
    put(f, "kernel_cases", np.array([len(cases)], np.int32))
    for i, (_, ternary, scale, x) in enumerate(cases):
        q, act_scale, row_sum = quant.quantize_activations(x)
        for name, a in [("ternary", ternary), ("row_scale", scale), ("x", x), ("q", q), ("act_scale", act_scale),
                        ("act_sum", row_sum), ("sums", quant.code_sums(ternary, q)),
                        ("out", quant.ternary_matmul(ternary, scale, q, act_scale, row_sum))]:
            put(f, f"k{i}.{name}", a)
    # the quantizer alone, at row lengths with a tail past the vector loops
    x = (rng.standard_normal((9, 333)) * 10.0 ** rng.integers(-6, 30, (9, 1))).astype(np.float32)
    q, act_scale, row_sum = quant.quantize_activations(x)
    put(f, "quant.x", x), put(f, "quant.q", q), put(f, "quant.act_scale", act_scale), put(f, "quant.act_sum", row_sum)


def head_weight(rng, type, vocab, d):
    w = (rng.standard_normal((vocab, d)) * 0.05).astype(np.float32)
    if type == "F16":
        return w.astype(np.float16).reshape(-1).view(np.uint8)
    if type == "Q8_0":
        return blocks.quantize_q8_0(w).reshape(-1)
    data = rng.integers(0, 256, (vocab, d // 256, 210), dtype=np.uint8)  # Q6_K: random blocks
    d16 = (rng.uniform(0.5, 2, (vocab, d // 256)) * 1e-3).astype(np.float16)
    data[..., 208:] = d16.view(np.uint8).reshape(vocab, d // 256, 2)
    return data.reshape(-1)


def write_ops(f, rng):
    best = kernels.ISAS[0]
    sets = [("portable", "portable")] + ([("fused", best)] if best in ("avx512", "avx2") else [])
    put(f, "ops_sets", np.array([len(sets)], np.int32))
    t, d, ffn = 5, 200, 300
    x = rng.standard_normal((t, d)).astype(np.float32) * 3
    w = (1 + 0.2 * rng.standard_normal(d)).astype(np.float32)
    gate = rng.standard_normal((t, ffn)).astype(np.float32) * 4
    up = rng.standard_normal((t, ffn)).astype(np.float32)
    gate[0, :4] = [100.0, -100.0, 0.0, -0.0]
    put(f, "norm.x", x), put(f, "norm.w", w), put(f, "gate", gate), put(f, "up", up)
    hx = rng.standard_normal((3, 512)).astype(np.float32)
    put(f, "head.x", hx)
    heads = {type: head_weight(rng, type, 37, 512) for type in ("F16", "Q8_0", "Q6_K")}
    for type, data in heads.items():
        put(f, f"head.{type}", data)
    n_ctx, hkv, group, hd, tq = 150, 2, 2, 64, 4  # past one 128-key block
    k, v = rng.standard_normal((2, n_ctx, hkv, hd)).astype(np.float32)
    q = rng.standard_normal((tq, hkv * group, hd)).astype(np.float32)
    positions = np.array([149, 3, 128, 77], np.int32)
    put(f, "att.k", k), put(f, "att.v", v), put(f, "att.q", q), put(f, "att.positions", positions)
    for tag, isa in sets:
        put(f, f"{tag}.norm", ops.rms_norm(x, w, 1e-5, isa=isa, n_threads=1))
        for act in ops.ACTIVATIONS:
            put(f, f"{tag}.gated.{act}", ops.gated(gate, up, act, isa=isa, n_threads=1))
        for type, data in heads.items():
            put(f, f"{tag}.head.{type}", ops.head_matmul(hx, data, 37, type, isa=isa, n_threads=1))
        for dtype in (np.float16, np.float32):
            ck, cv = np.zeros((n_ctx, hkv, hd), dtype), np.zeros((n_ctx, hkv, hd), dtype)
            ops.store_kv(ck, cv, k, v, 0, isa=isa)
            name = "f16" if dtype == np.float16 else "f32"
            if dtype == np.float16:
                put(f, f"{tag}.kv16", ck.view(np.uint16))
            put(f, f"{tag}.att.{name}", ops.attention(q, ck, cv, positions, isa=isa, n_threads=1))


def main(path):
    rng = np.random.default_rng(17)
    with open(path, "wb") as f:
        write_kernels(f, rng)
        write_ops(f, rng)
    print(f"{path}: kernel vectors from the NumPy reference, ops vectors from {kernels.ISAS[0]} and portable "
          f"({_native.__name__})")


if __name__ == "__main__":
    main(sys.argv[1])
