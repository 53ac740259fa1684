"""Triton kernels of the GPU engine, and the 2-bit weight layout they read.

Layout ("planes"): a ternary matrix [M, K] is stored as int32 words [M, Kp / 16], Kp = K
rounded up to a multiple of 512 (padded with weight 0). Each row is cut into blocks of 512
columns, 32 words each (128 bytes, one cache line); bits 2j..2j+1 of word w of a block hold the
code (ternary + 1: 0, 1 or 2) of column 32j + w of that block. Why:
- a block of rows is read as whole 128-byte lines, 16 bytes per thread, the loads coalesced;
- one shift by 2j of a block's 32 words gives 32 *consecutive* columns (plane j): the GEMM
  unpacks a block into a [rows, 512] int8 tile whose columns are in order, and multiplies it by
  an ordinary [tokens, 512] slice of the activations on the int8 tensor cores (`tl.dot`,
  int32 accumulation: exact);
- the GEMV (one token) needs no mask at all: with v_j = word >> 2j (unsigned) the code of plane
  j is v_j - 4 v_(j+1), so sum_j code_j x_j = sum_j v_j (x_j - 4 x_(j-1)). The quantizer writes
  y = x_j - 4 x_(j-1) beside x, and the GEMV does one shift and one multiply-add per weight,
  in wrapping 32-bit arithmetic (exact: the true sum fits in int32).

Arithmetic is the CPU's (`tritlm.quant.arithmetic`) step by step: per-token absmax int8
activations, scale = (float)(127 / max(amax, 1e-5)) in double, round half to even; integer sums
S = sum(code * q) and A = sum(q); y = ((float)S - (float)A) / scale * row_scale with an IEEE
division. Kernels are launched with fused multiply-add contraction off (`_launch`), so that each
float step rounds as on the CPU; integer sums are exact, so the linears equal the CPU's bit for
bit given the same activations.

Every kernel also runs in Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors: that is
how CI tests them without a GPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK_COLS = 512  # columns per layout block
BLOCK_WORDS = 32  # int32 words per row per block
ROUND = tl.constexpr(12582912.0)  # 1.5 * 2**23: + and - it round a float32 |v| < 2**22 half to even


def _interpreter_loop_bounds() -> None:
    """Triton 3.6's interpreter takes a loop bound's value with int() of a one-element array,
    which NumPy >= 2.4 refuses: take it with .item() instead, for the interpreter's lifetime."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "patched_by_tritlm", False):
        return

    def patch_lang(fn):
        scope = original(fn)
        scope.set_attr(tl.core.tensor, "__index__", lambda self: int(self.handle.data.item()))
        return scope

    patch_lang.patched_by_tritlm = True
    interpreter._patch_lang = patch_lang


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    _interpreter_loop_bounds()


def padded_k(k: int) -> int:
    return -(-k // BLOCK_COLS) * BLOCK_COLS


def _launch(kernel, grid, *args, **meta):
    kernel[grid](*args, enable_fp_fusion=False, **meta)


# ------------------------------------------------------------------------------ weight layout

def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes [M, K] (ternary + 1, any integer dtype) -> int32 words [M, Kp / 16], on the codes'
    device."""
    m, k = codes.shape
    kp = padded_k(k)
    padded = torch.ones((m, kp), dtype=torch.int32, device=codes.device)  # code 1: weight 0
    padded[:, :k] = codes
    planes = padded.view(m, kp // BLOCK_COLS, 16, BLOCK_WORDS)  # [row, block, j, word]
    words = torch.zeros((m, kp // BLOCK_COLS, BLOCK_WORDS), dtype=torch.int32, device=codes.device)
    for j in range(16):
        words |= planes[:, :, j] << (2 * j)  # (wraps into the sign bit for j = 15, as meant)
    return words.view(m, kp // 16)


def unpack_codes(words: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of pack_codes: codes int32 [M, K]."""
    m = words.shape[0]
    blocks = words.view(m, -1, 1, BLOCK_WORDS)
    shifts = (2 * torch.arange(16, device=words.device, dtype=torch.int32)).view(1, 1, 16, 1)
    return ((blocks >> shifts) & 3).reshape(m, -1)[:, :k]


@dataclass
class Matrix:
    """A ternary matrix on the device: words [M, Kp / 16] int32, scale [M] float32."""

    words: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.words.numel() * 4 + self.scale.numel() * 4


# ------------------------------------------------------------------------------- activations

@dataclass
class Activations:
    """Quantized activations of T tokens: q int8 [T, Kp] (zero past K), y int32 [T, Kp] (the
    GEMV's telescoped form, or None), scale float32 [T], sum int32 [T]."""

    q: torch.Tensor
    y: torch.Tensor | None
    scale: torch.Tensor
    sum: torch.Tensor


@triton.jit
def _values(row, offs, mask, K, GATED: tl.constexpr, RELU2: tl.constexpr):
    """The row's input at offs: x, or the gated product of gate (x[:K]) and up (x[K:2K])."""
    if GATED:
        g = tl.load(row + offs, mask=mask, other=0.0)
        u = tl.load(row + K + offs, mask=mask, other=0.0)
        if RELU2:
            m = tl.maximum(g, 0.0)
            v = m * m * u
        else:
            v = tl.math.div_rn(g, 1.0 + tl.exp(-g)) * u
    else:
        v = tl.load(row + offs, mask=mask, other=0.0)
    return v


@triton.jit
def _quantized(h, scale):
    v = tl.minimum(tl.maximum(h * scale, -128.0), 127.0)
    return ((v + ROUND) - ROUND).to(tl.int32)


@triton.jit
def _act_kernel(x_ptr, x_stride, norm_ptr, q_ptr, y_ptr, scale_ptr, sum_ptr, h_ptr, K, KP, eps,
                GATED: tl.constexpr, RELU2: tl.constexpr, HAS_NORM: tl.constexpr,
                WITH_Y: tl.constexpr, FLOAT_OUT: tl.constexpr, BLOCK: tl.constexpr):
    """One token per program: [gated ->] [RMSNorm ->] float out, or int8 quantization."""
    t = tl.program_id(0).to(tl.int64)
    row = x_ptr + t * x_stride
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    v = _values(row, offs, mask, K, GATED, RELU2)
    r = 1.0
    w = tl.full([BLOCK], 1.0, tl.float32)
    if HAS_NORM:  # x * (float)(1 / sqrt(mean(x^2) + eps)) * weight, the mean in double
        v64 = v.to(tl.float64)
        mean = tl.sum(v64 * v64, axis=0) / K
        r = (1.0 / tl.sqrt(mean + eps)).to(tl.float32)  # (float64: correctly rounded)
        w = tl.load(norm_ptr + offs, mask=mask, other=0.0)
    h = v * r * w
    if FLOAT_OUT:
        tl.store(h_ptr + t * K + offs, h, mask=mask)
    else:
        amax = tl.max(tl.abs(h), axis=0)
        scale = (127.0 / tl.maximum(amax.to(tl.float64), 1e-5)).to(tl.float32)
        q = _quantized(h, scale)
        tl.store(q_ptr + t * KP + offs, q.to(tl.int8), mask=offs < KP)
        tl.store(scale_ptr + t, scale)
        tl.store(sum_ptr + t, tl.sum(q, axis=0))
        if WITH_Y:  # y = q - 4 q[32 columns back] inside each 512-column block
            prev = offs - 32
            has_prev = ((offs % 512) >= 32) & (prev < K)
            vp = _values(row, prev, has_prev, K, GATED, RELU2)
            if HAS_NORM:
                wp = tl.load(norm_ptr + prev, mask=has_prev, other=0.0)
            else:
                wp = w
            qp = tl.where(has_prev, _quantized(vp * r * wp, scale), 0)
            tl.store(y_ptr + t * KP + offs, q - 4 * qp, mask=offs < KP)


def _act_launch(x, norm, eps, gated, relu2, float_out, with_y):
    t, width = x.shape
    k = width // 2 if gated else width
    kp = padded_k(k)
    empty = lambda shape, dtype: torch.empty(shape, dtype=dtype, device=x.device)  # noqa: E731
    if float_out:
        h = empty((t, k), torch.float32)
        q = y = scale = total = h  # (unused by the kernel)
    else:
        h = x  # (unused by the kernel)
        q, scale, total = empty((t, kp), torch.int8), empty(t, torch.float32), empty(t, torch.int32)
        y = empty((t, kp), torch.int32) if with_y else q
    block = triton.next_power_of_2(kp)
    _launch(_act_kernel, (t,), x, x.stride(0), norm if norm is not None else x, q, y, scale, total, h, k, kp, eps,
            GATED=gated, RELU2=relu2, HAS_NORM=norm is not None, WITH_Y=with_y, FLOAT_OUT=float_out, BLOCK=block,
            num_warps=min(16, max(4, block // 512)))
    return h if float_out else Activations(q, y if with_y else None, scale, total)


def quantize(x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0, *,
             gated: bool = False, relu2: bool = False, with_y: bool = False) -> Activations:
    """int8 activations of x float32 [T, K] (contiguous rows), RMSNorm-ed by `norm` first if
    given; gated: x is [T, 2F] (gate then up) and the input is relu2(gate) * up or silu(gate) * up."""
    return _act_launch(x, norm, eps, gated, relu2, False, with_y)


def rms_norm(x: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor:
    return _act_launch(x, norm, eps, False, False, True, False)


# ----------------------------------------------------------------------------------- linears

@triton.jit
def _epilogue(s, act_sum, act_scale, row_scale):
    return tl.math.div_rn(s.to(tl.float32) - act_sum.to(tl.float32), act_scale) * row_scale


@triton.jit
def _gemv_kernel(y_ptr, scale_ptr, sum_ptr, w_ptr, row_scale_ptr, out_ptr, M, KW, KP, out_stride,
                 HAS_RES: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr):
    """out[t, rows] (+)= one token's y times BN rows, BW words (BW / 32 blocks) per step."""
    pid = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    rows = pid * BN + tl.arange(0, BN)
    cols = tl.arange(0, BW)
    rmask = rows < M
    xcol = (cols // 32) * 512 + cols % 32  # plane 0's column of each word
    acc = tl.zeros([BN, BW], dtype=tl.uint32)
    for kw in range(0, KW, BW):
        cmask = kw + cols < KW
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * KW + kw + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0).to(tl.uint32, bitcast=True)
        base = y_ptr + t * KP + (kw // 32) * 512 + xcol
        for j in tl.static_range(16):
            yj = tl.load(base + 32 * j, mask=cmask, other=0).to(tl.uint32, bitcast=True)
            acc += (w >> (2 * j)) * yj[None, :]
    s = tl.sum(acc, axis=1).to(tl.int32, bitcast=True)
    out = _epilogue(s, tl.load(sum_ptr + t), tl.load(scale_ptr + t),
                    tl.load(row_scale_ptr + rows, mask=rmask, other=0.0))
    dst = out_ptr + t * out_stride + rows
    if HAS_RES:
        out = tl.load(dst, mask=rmask, other=0.0) + out
    tl.store(dst, out, mask=rmask)


@triton.jit
def _gemm_kernel(q_ptr, scale_ptr, sum_ptr, w_ptr, row_scale_ptr, out_ptr, T, M, KW, KP, out_stride,
                 HAS_RES: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr):
    """out[tokens, rows] (+)= q [BT tokens, 512] . codes [512, BN rows] per block, int8 dots."""
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    toks = pid_t * BT + tl.arange(0, BT)
    rows = pid_n * BN + tl.arange(0, BN)
    words = tl.arange(0, 32)
    cols = tl.arange(0, 512)
    tmask = toks < T
    rmask = rows < M
    shifts = 2 * tl.arange(0, 16)
    acc = tl.zeros([BT, BN], dtype=tl.int32)
    for kw in range(0, KW, 32):  # one 512-column block per step
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * KW + kw + words[None, :],
                    mask=rmask[:, None], other=0)
        codes = tl.reshape(((w[:, None, :] >> shifts[None, :, None]) & 3).to(tl.int8), (BN, 512))
        x = tl.load(q_ptr + toks.to(tl.int64)[:, None] * KP + kw * 16 + cols[None, :],
                    mask=tmask[:, None], other=0)
        acc = tl.dot(x, tl.trans(codes), acc, out_dtype=tl.int32)
    out = _epilogue(acc, tl.load(sum_ptr + toks, mask=tmask, other=0)[:, None],
                    tl.load(scale_ptr + toks, mask=tmask, other=1.0)[:, None],
                    tl.load(row_scale_ptr + rows, mask=rmask, other=0.0)[None, :])
    dst = out_ptr + toks.to(tl.int64)[:, None] * out_stride + rows[None, :]
    mask = tmask[:, None] & rmask[None, :]
    if HAS_RES:
        out = tl.load(dst, mask=mask, other=0.0) + out
    tl.store(dst, out, mask=mask)


# The GEMV is latency-bound unless thousands of warps are in flight: each program takes a few
# rows whole (up to 512 words of each: one load wave, no loop for K <= 8192), (words per program,
# warps) by row length. Measured on an H200 (benchmarks/cuda_tiles.py), 1024 words and 2 warps
# beat 2048 and 4 by 15-25% on rows of up to 256 words (K <= 4096), not on longer ones. (The
# interpreter runs fewer, larger programs faster.)
GEMV_SHORT, GEMV_LONG = (1024, 2), (2048, 4)


def _gemv_tile(kw: int) -> tuple[int, int, int]:
    """(rows, words per step, warps) of a program for rows of kw words."""
    bw = min(triton.next_power_of_2(kw), 512)
    words, warps = (1 << 14, 4) if INTERPRET else GEMV_SHORT if kw <= 256 else GEMV_LONG
    return max(1, words // bw), bw, warps


def _gemm_tile(t: int) -> tuple[int, int, int]:
    """(tokens, rows, warps) of a GEMM program, by token count."""
    return (16, 32, 4) if t <= 16 else (32, 64, 4) if t <= 32 else (64, 64, 4) if t < 256 else (128, 64, 8)


def linear(act: Activations, w: Matrix, out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """out [T, M] = the ternary matrix times the activations (out += ... with accumulate).
    One token with act.y: the GEMV; else the int8 tensor-core GEMM."""
    t = act.q.shape[0]
    m, kw = w.shape[0], w.words.shape[1]
    if out is None:
        out = torch.empty((t, m), dtype=torch.float32, device=act.q.device)
    if t == 1 and act.y is not None:
        bn, bw, warps = _gemv_tile(kw)
        _launch(_gemv_kernel, (triton.cdiv(m, bn), 1), act.y, act.scale, act.sum, w.words, w.scale, out,
                m, kw, act.q.shape[1], out.stride(0), HAS_RES=accumulate, BN=bn, BW=bw, num_warps=warps)
    else:
        bt, bn, warps = _gemm_tile(t)
        _launch(_gemm_kernel, (triton.cdiv(m, bn), triton.cdiv(t, bt)), act.q, act.scale, act.sum, w.words,
                w.scale, out, t, m, kw, act.q.shape[1], out.stride(0), HAS_RES=accumulate, BT=bt, BN=bn,
                num_warps=warps, num_stages=2)
    return out


# --------------------------------------------------------------------- RoPE, cache, attention

@triton.jit
def _rope_cache_kernel(qkv_ptr, qkv_stride, pos_ptr, kv_ptr, plane_ptr, cos_ptr, sin_ptr, q_out_ptr,
                       layer, HQ, HKV, D, HALF, NEOX: tl.constexpr, KV_F32: tl.constexpr,
                       BH: tl.constexpr, BHALF: tl.constexpr, BD: tl.constexpr):
    """One token: rotate its q into q_out, its k into the cache, and copy its v there."""
    t = tl.program_id(0).to(tl.int64)
    p = tl.load(pos_ptr + t)
    i = tl.arange(0, BHALF)
    im = i < HALF
    c = tl.load(cos_ptr + p * HALF + i, mask=im, other=0.0)[None, :]
    s = tl.load(sin_ptr + p * HALF + i, mask=im, other=0.0)[None, :]
    if NEOX:  # pairs (i, i + D/2), else (2i, 2i + 1)
        ia = i
        ib = i + HALF
    else:
        ia = 2 * i
        ib = 2 * i + 1
    h = tl.arange(0, BH)
    row = qkv_ptr + t * qkv_stride
    qm = (h < HQ)[:, None] & im[None, :]
    a = tl.load(row + h[:, None] * D + ia[None, :], mask=qm, other=0.0)
    b = tl.load(row + h[:, None] * D + ib[None, :], mask=qm, other=0.0)
    q_out = q_out_ptr + t * HQ * D + h[:, None] * D
    tl.store(q_out + ia[None, :], a * c - b * s, mask=qm)
    tl.store(q_out + ib[None, :], b * c + a * s, mask=qm)
    if KV_F32:
        cache = tl.load(kv_ptr + t).to(tl.pointer_type(tl.float32))
    else:
        cache = tl.load(kv_ptr + t).to(tl.pointer_type(tl.float16))
    plane = tl.load(plane_ptr + t)
    k_dst = cache + (2 * layer) * plane + p * HKV * D + h[:, None] * D
    km = (h < HKV)[:, None] & im[None, :]
    a = tl.load(row + HQ * D + h[:, None] * D + ia[None, :], mask=km, other=0.0)
    b = tl.load(row + HQ * D + h[:, None] * D + ib[None, :], mask=km, other=0.0)
    tl.store(k_dst + ia[None, :], (a * c - b * s).to(cache.dtype.element_ty), mask=km)
    tl.store(k_dst + ib[None, :], (b * c + a * s).to(cache.dtype.element_ty), mask=km)
    d = tl.arange(0, BD)
    vm = (h < HKV)[:, None] & (d < D)[None, :]
    v = tl.load(row + (HQ + HKV) * D + h[:, None] * D + d[None, :], mask=vm, other=0.0)
    tl.store(k_dst + plane + d[None, :], v.to(cache.dtype.element_ty), mask=vm)


@triton.jit
def _attention_kernel(q_ptr, pos_ptr, kv_ptr, plane_ptr, out_ptr, layer, HQ, HKV, D, scale,
                      KV_F32: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    """One (token, query head): softmax over cache rows 0..position, online, in float32."""
    t = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    g = hq // (HQ // HKV)
    p = tl.load(pos_ptr + t)
    if KV_F32:
        cache = tl.load(kv_ptr + t).to(tl.pointer_type(tl.float32))
    else:
        cache = tl.load(kv_ptr + t).to(tl.pointer_type(tl.float16))
    plane = tl.load(plane_ptr + t)
    d = tl.arange(0, BD)
    dm = d < D
    k_base = cache + (2 * layer) * plane + g * D + d[None, :]
    q = tl.load(q_ptr + (t * HQ + hq) * D + d, mask=dm, other=0.0)
    if not KV_F32:  # q . k against an f16 cache takes q rounded to f16 (nearest even), as ggml does
        q = q.to(tl.float16).to(tl.float32)
    m = tl.full([1], float("-inf"), tl.float32)
    total = tl.zeros([1], tl.float32)
    acc = tl.zeros([BD], tl.float32)
    for start in range(0, p + 1, BN):
        n = start + tl.arange(0, BN)
        nm = n <= p
        mask = nm[:, None] & dm[None, :]
        offs = n.to(tl.int64)[:, None] * (HKV * D)
        k = tl.load(k_base + offs, mask=mask, other=0.0).to(tl.float32)
        scores = tl.where(nm, tl.sum(q[None, :] * k, axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        alpha = tl.exp(m - m_new)
        probs = tl.exp(scores - m_new)
        v = tl.load(k_base + plane + offs, mask=mask, other=0.0).to(tl.float32)
        total = total * alpha + tl.sum(probs, axis=0)
        acc = acc * alpha + tl.sum(probs[:, None] * v, axis=0)
        m = m_new
    tl.store(out_ptr + (t * HQ + hq) * D + d, acc / total, mask=dm)


def rope_and_cache(qkv, positions, kv_addr, kv_plane, cos, sin, layer, hq, hkv, d, neox, kv_f32):
    """q rotated [T, hq * d]; k rotated and v stored in each token's cache at its position."""
    t = qkv.shape[0]
    q = torch.empty((t, hq * d), dtype=torch.float32, device=qkv.device)
    half = d // 2
    _launch(_rope_cache_kernel, (t,), qkv, qkv.stride(0), positions, kv_addr, kv_plane, cos, sin, q, layer,
            hq, hkv, d, half, NEOX=neox, KV_F32=kv_f32, BH=triton.next_power_of_2(hq),
            BHALF=triton.next_power_of_2(half), BD=triton.next_power_of_2(d), num_warps=4)
    return q


def attention(q, positions, kv_addr, kv_plane, layer, hq, hkv, d, kv_f32):
    t = q.shape[0]
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(d)  # in double; the kernel takes it as float, as the CPU does
    _launch(_attention_kernel, (t, hq), q, positions, kv_addr, kv_plane, out, layer, hq, hkv, d, scale,
            KV_F32=kv_f32, BD=triton.next_power_of_2(d), BN=64 if d <= 64 else 32, num_warps=4)
    return out


# ----------------------------------------------------------------------------------- LM head

@triton.jit
def _head_kernel(h_ptr, w_ptr, out_ptr, R, V, D, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """logits [R, V] = h [R, D] (float32, split into two halves: hi + lo) . w [V, D] (float16)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k in range(0, D, BK):
        km = k + ks < D
        x = tl.load(h_ptr + rows.to(tl.int64)[:, None] * D + k + ks[None, :],
                    mask=(rows < R)[:, None] & km[None, :], other=0.0)
        hi = x.to(tl.float16)
        lo = (x - hi.to(tl.float32)).to(tl.float16)
        w = tl.trans(tl.load(w_ptr + cols.to(tl.int64)[:, None] * D + k + ks[None, :],
                             mask=(cols < V)[:, None] & km[None, :], other=0.0))
        acc = tl.dot(hi, w, acc)
        acc = tl.dot(lo, w, acc)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * V + cols[None, :], acc,
             mask=(rows < R)[:, None] & (cols < V)[None, :])


@triton.jit
def _head_gemv_kernel(h_ptr, w_ptr, out_ptr, V, D, BN: tl.constexpr, BK: tl.constexpr):
    """logits [V] of one hidden state h [D] (float32) and w [V, D] (float16): BN rows per
    program, float32 products and sums, the next step's weights loaded while this one adds."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < V
    ks = tl.arange(0, BK)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * D
    w = tl.load(w_rows + ks[None, :], mask=rmask[:, None] & (ks < D)[None, :], other=0.0)
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k in range(0, D, BK):
        cur = w.to(tl.float32)
        x = tl.load(h_ptr + k + ks, mask=k + ks < D, other=0.0)
        nxt = k + BK + ks
        w = tl.load(w_rows + nxt[None, :], mask=rmask[:, None] & (nxt < D)[None, :], other=0.0)
        acc += cur * x[None, :]
    tl.store(out_ptr + rows, tl.sum(acc, axis=1), mask=rmask)


def head(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Logits float32 [R, V] of hidden states h float32 [R, D] and the head w float16 [V, D]:
    one row streams the head through float32 products (at the copy bandwidth on an H200), more
    go through tensor-core dots of h split in two float16 halves."""
    r, d = h.shape
    v = w.shape[0]
    out = torch.empty((r, v), dtype=torch.float32, device=h.device)
    if r == 1:
        _launch(_head_gemv_kernel, (triton.cdiv(v, 16),), h, w, out, v, d, BN=16, BK=256, num_warps=4)
        return out
    bm = 16 if r <= 16 else 64
    _launch(_head_kernel, (triton.cdiv(v, 128), triton.cdiv(r, bm)), h, w, out, r, v, d, BM=bm, BN=128, BK=32,
            num_warps=4, num_stages=4)
    return out
