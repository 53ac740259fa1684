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
  j is v_j - 4 v_(j+1), so sum_j code_j x_j = sum_j v_j (x_j - 4 x_(j-1)). The GEMV forms
  y_j = x_j - 4 x_(j-1) once per word as it walks the planes, then does one shift and one
  multiply-add per weight, in wrapping 32-bit arithmetic (exact: the true sum fits in int32).

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
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

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


# Programmatic dependent launch (Hopper), off by default: the decode kernels start while the one
# before them finishes, load what no kernel writes (weights), then wait for it (_after_previous).
# An experiment `tritlm bench --device cuda` measures beside the default.
PDL = False


def _launch(kernel, grid, *args, pdl=False, **meta):
    """kernel[grid](args), without fused multiply-add; pdl: a kernel that calls _after_previous."""
    if pdl:
        meta.update(PDL=PDL, launch_pdl=PDL)
    kernel[grid](*args, enable_fp_fusion=False, **meta)


@triton.jit
def _after_previous(PDL: tl.constexpr):
    """With programmatic dependent launch: let the next kernel start, and wait until the previous
    one has finished (its writes visible). Nothing before this may read what a kernel writes."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


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
    """Quantized activations of T tokens: q int8 [T, Kp] (zero past K), scale float32 [T],
    sum int32 [T]."""

    q: torch.Tensor
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
def _rms(v, norm_ptr, offs, mask, K, eps, HAS_NORM: tl.constexpr):
    """RMSNorm's factor r and weights w of a row v (h = v * r * w): r = (float)(1 / sqrt(mean(v^2)
    + eps)), the mean in double; r = w = 1 without a norm."""
    if HAS_NORM:
        v64 = v.to(tl.float64)
        mean = tl.sum(v64 * v64, axis=0) / K
        r = (1.0 / tl.sqrt(mean + eps)).to(tl.float32)  # (float64: correctly rounded)
        w = tl.load(norm_ptr + offs, mask=mask, other=0.0)
    else:
        r = 1.0
        w = tl.full(v.shape, 1.0, tl.float32)
    return r, w


@triton.jit
def _act_scale(h):
    """The int8 scale of a row: (float)(127 / max(amax, 1e-5)), in double."""
    amax = tl.max(tl.abs(h), axis=0)
    return (127.0 / tl.maximum(amax.to(tl.float64), 1e-5)).to(tl.float32)


@triton.jit
def _act_kernel(x_ptr, x_stride, norm_ptr, q_ptr, scale_ptr, sum_ptr, h_ptr, K, KP, eps,
                GATED: tl.constexpr, RELU2: tl.constexpr, HAS_NORM: tl.constexpr,
                FLOAT_OUT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One token per program: [gated ->] [RMSNorm ->] float out, or int8 quantization."""
    _after_previous(PDL)
    t = tl.program_id(0).to(tl.int64)
    row = x_ptr + t * x_stride
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    v = _values(row, offs, mask, K, GATED, RELU2)
    r, w = _rms(v, norm_ptr, offs, mask, K, eps, HAS_NORM)
    h = v * r * w
    if FLOAT_OUT:
        tl.store(h_ptr + t * K + offs, h, mask=mask)
    else:
        scale = _act_scale(h)
        q = _quantized(h, scale)
        tl.store(q_ptr + t * KP + offs, q.to(tl.int8), mask=offs < KP)
        tl.store(scale_ptr + t, scale)
        tl.store(sum_ptr + t, tl.sum(q, axis=0))


def _act_launch(x, norm, eps, gated, relu2, float_out):
    t, width = x.shape
    k = width // 2 if gated else width
    kp = padded_k(k)
    empty = lambda shape, dtype: torch.empty(shape, dtype=dtype, device=x.device)  # noqa: E731
    if float_out:
        h = empty((t, k), torch.float32)
        q = scale = total = h  # (unused by the kernel)
    else:
        h = x  # (unused by the kernel)
        q, scale, total = empty((t, kp), torch.int8), empty(t, torch.float32), empty(t, torch.int32)
    block = triton.next_power_of_2(kp)
    _launch(_act_kernel, (t,), x, x.stride(0), norm if norm is not None else x, q, scale, total, h, k, kp, eps,
            GATED=gated, RELU2=relu2, HAS_NORM=norm is not None, FLOAT_OUT=float_out, BLOCK=block,
            num_warps=min(16, max(4, block // 512)), pdl=True)
    return h if float_out else Activations(q, scale, total)


def quantize(x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0, *,
             gated: bool = False, relu2: bool = False) -> Activations:
    """int8 activations of x float32 [T, K] (contiguous rows), RMSNorm-ed by `norm` first if
    given; gated: x is [T, 2F] (gate then up) and the input is relu2(gate) * up or silu(gate) * up."""
    return _act_launch(x, norm, eps, gated, relu2, False)


def rms_norm(x: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor:
    return _act_launch(x, norm, eps, False, False, True)


# ----------------------------------------------------------------------------------- linears

@triton.jit
def _epilogue(s, act_sum, act_scale, row_scale):
    return tl.math.div_rn(s.to(tl.float32) - act_sum.to(tl.float32), act_scale) * row_scale


@triton.jit
def _gemv_kernel(x_ptr, norm_ptr, eps, q_ptr, scale_ptr, sum_ptr, w_ptr, row_scale_ptr, out_ptr, M, K, KW,
                 QUANTIZE: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RES: tl.constexpr,
                 WORDS: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """out[rows] (+)= one token's activations times WORDS / BW rows, BW words (BW / 32 blocks)
    per step.
    The activations: int8 q [Kp] with its scale and sum, or (QUANTIZE) the float row x [K],
    RMSNorm-ed (HAS_NORM) and quantized here, by every program alike, as _act_kernel does: one
    kernel instead of two, its latency hidden behind the first weight load."""
    BN: tl.constexpr = WORDS // BW
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < M
    cols = tl.arange(0, BW)
    xcol = (cols // 32) * 512 + cols % 32  # plane 0's column of each word
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * KW
    w = tl.load(w_rows + cols[None, :], mask=rmask[:, None] & (cols < KW)[None, :], other=0)
    _after_previous(PDL)
    if QUANTIZE:
        offs = tl.arange(0, BK)
        mask = offs < K
        v = tl.load(x_ptr + offs, mask=mask, other=0.0)
        r, nw = _rms(v, norm_ptr, offs, mask, K, eps, HAS_NORM)
        scale = _act_scale(v * r * nw)
        total = tl.zeros([BW], tl.int32)
    else:
        scale = tl.load(scale_ptr)
    acc = tl.zeros([BN, BW], dtype=tl.uint32)
    for kw in range(0, KW, BW):
        cmask = kw + cols < KW
        words = w.to(tl.uint32, bitcast=True)
        nxt = kw + BW + cols  # the next step's words, loaded while this one computes
        w = tl.load(w_rows + nxt[None, :], mask=rmask[:, None] & (nxt < KW)[None, :], other=0)
        base = (kw // 32) * 512 + xcol
        prev = tl.zeros([BW], tl.int32)
        for j in tl.static_range(16):
            c = base + 32 * j
            if QUANTIZE:
                cm = cmask & (c < K)
                xj = tl.load(x_ptr + c, mask=cm, other=0.0)
                if HAS_NORM:
                    nj = tl.load(norm_ptr + c, mask=cm, other=0.0)
                else:
                    nj = 1.0
                qj = _quantized(xj * r * nj, scale)
                total += qj
            else:
                qj = tl.load(q_ptr + c, mask=cmask, other=0).to(tl.int32)
            y = (qj - 4 * prev).to(tl.uint32, bitcast=True)  # y_j = q_j - 4 q_(j-1)
            acc += (words >> (2 * j)) * y[None, :]
            prev = qj
    s = tl.sum(acc, axis=1).to(tl.int32, bitcast=True)
    if QUANTIZE:
        act_sum = tl.sum(total, axis=0)
    else:
        act_sum = tl.load(sum_ptr)
    out = _epilogue(s, act_sum, scale, tl.load(row_scale_ptr + rows, mask=rmask, other=0.0))
    if HAS_RES:
        out = tl.load(out_ptr + rows, mask=rmask, other=0.0) + out
    tl.store(out_ptr + rows, out, mask=rmask)


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
# rows whole (up to GEMV_MAX_WORDS words of each: one load wave, no loop for K <= 8192). How many
# rows and warps is measured once per shape on the GPU (triton.autotune, among GEMV_TILES: words
# per program, at least GEMV_MAX_WORDS, and warps); the interpreter runs fewer, larger programs
# faster.
GEMV_MAX_WORDS = 512
GEMV_TILES = ((512, 2), (1024, 2), (2048, 4), (2048, 8), (4096, 8))
INTERPRET_GEMV_WORDS = 1 << 14


def _autotuned(kernel, configs, key, **options):
    """kernel tuned on the GPU among configs (timed once per key, a few ms each); as it is in the
    interpreter, where the launcher gives the tile itself."""
    if INTERPRET:
        return kernel
    bench = lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)  # noqa: E731
    return triton.autotune(configs, key, do_bench=bench, **options)(kernel)


_gemv = _autotuned(_gemv_kernel, [triton.Config({"WORDS": words}, num_warps=warps) for words, warps in GEMV_TILES],
                   ["M", "KW", "QUANTIZE"], restore_value=["out_ptr"])


def _gemm_tile(t: int) -> tuple[int, int, int]:
    """(tokens, rows, warps) of a GEMM program, by token count."""
    return (16, 32, 4) if t <= 16 else (32, 64, 4) if t <= 32 else (64, 64, 4) if t < 256 else (128, 64, 8)


def _gemv_launch(w: Matrix, out: torch.Tensor | None, accumulate: bool, device, **args) -> torch.Tensor:
    m, kw = w.shape[0], w.words.shape[1]
    if out is None:
        out = torch.empty((1, m), dtype=torch.float32, device=device)
    bw = min(triton.next_power_of_2(kw), GEMV_MAX_WORDS)
    tile = {"WORDS": INTERPRET_GEMV_WORDS, "num_warps": 4} if INTERPRET else {}
    _launch(_gemv, lambda meta: (triton.cdiv(m, meta["WORDS"] // bw),), w_ptr=w.words, row_scale_ptr=w.scale,
            out_ptr=out, M=m, KW=kw, HAS_RES=accumulate, BW=bw, **args, **tile, pdl=True)
    return out


def linear(act: Activations, w: Matrix, out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """out [T, M] = the ternary matrix times the activations (out += ... with accumulate).
    One token: the GEMV; else the int8 tensor-core GEMM."""
    t = act.q.shape[0]
    if t == 1:
        return _gemv_launch(w, out, accumulate, act.q.device, x_ptr=act.scale, norm_ptr=act.scale, eps=0.0,
                            q_ptr=act.q, scale_ptr=act.scale, sum_ptr=act.sum, K=w.shape[1],
                            QUANTIZE=False, HAS_NORM=False, BK=1)
    m, kw = w.shape[0], w.words.shape[1]
    if out is None:
        out = torch.empty((t, m), dtype=torch.float32, device=act.q.device)
    bt, bn, warps = _gemm_tile(t)
    _launch(_gemm_kernel, (triton.cdiv(m, bn), triton.cdiv(t, bt)), act.q, act.scale, act.sum, w.words,
            w.scale, out, t, m, kw, act.q.shape[1], out.stride(0), HAS_RES=accumulate, BT=bt, BN=bn,
            num_warps=warps, num_stages=2)
    return out


def norm_linear(x: torch.Tensor, norm: torch.Tensor | None, eps: float, w: Matrix,
                out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """linear(quantize(x, norm, eps), w, out, accumulate); one token in one kernel (the GEMV
    normalizes and quantizes x itself)."""
    if x.shape[0] != 1:
        return linear(quantize(x, norm, eps), w, out, accumulate)
    k = x.shape[1]
    return _gemv_launch(w, out, accumulate, x.device, x_ptr=x, norm_ptr=x if norm is None else norm, eps=eps,
                        q_ptr=x, scale_ptr=x, sum_ptr=x, K=k, QUANTIZE=True, HAS_NORM=norm is not None,
                        BK=triton.next_power_of_2(k))


# --------------------------------------------------------------------- RoPE, cache, attention

@triton.jit
def _rope_cache_kernel(qkv_ptr, qkv_stride, pos_ptr, kv_ptr, plane_ptr, cos_ptr, sin_ptr, q_out_ptr,
                       layer, HQ, HKV, D, HALF, NEOX: tl.constexpr, KV_F32: tl.constexpr,
                       BH: tl.constexpr, BHALF: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr):
    """One token: rotate its q into q_out, its k into the cache, and copy its v there."""
    _after_previous(PDL)
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
                      KV_F32: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr):
    """One (token, query head): softmax over cache rows 0..position, online, in float32."""
    _after_previous(PDL)
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
            BHALF=triton.next_power_of_2(half), BD=triton.next_power_of_2(d), num_warps=4, pdl=True)
    return q


def attention(q, positions, kv_addr, kv_plane, layer, hq, hkv, d, kv_f32):
    t = q.shape[0]
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(d)  # in double; the kernel takes it as float, as the CPU does
    _launch(_attention_kernel, (t, hq), q, positions, kv_addr, kv_plane, out, layer, hq, hkv, d, scale,
            KV_F32=kv_f32, BD=triton.next_power_of_2(d), BN=64 if d <= 64 else 32, num_warps=4, pdl=True)
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
def _head_gemv_kernel(h_ptr, w_ptr, out_ptr, V, D, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """logits [V] of one hidden state h [D] (float32) and w [V, D] (float16): BN rows per
    program, float32 products and sums, the next step's weights loaded while this one adds."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < V
    ks = tl.arange(0, BK)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * D
    w = tl.load(w_rows + ks[None, :], mask=rmask[:, None] & (ks < D)[None, :], other=0.0)
    _after_previous(PDL)
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k in range(0, D, BK):
        cur = w.to(tl.float32)
        x = tl.load(h_ptr + k + ks, mask=k + ks < D, other=0.0)
        nxt = k + BK + ks
        w = tl.load(w_rows + nxt[None, :], mask=rmask[:, None] & (nxt < D)[None, :], other=0.0)
        acc += cur * x[None, :]
    tl.store(out_ptr + rows, tl.sum(acc, axis=1), mask=rmask)


# The head streams 2 bytes per weight (more than all the ternary matrices of a 2B model), so
# what counts is bytes in flight per multiprocessor; tiles (rows, columns per step, [stages,]
# warps) measured once per shape on the GPU.
HEAD_TILES = ((128, 32, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4), (256, 64, 3, 8))
HEAD_GEMV_TILES = ((8, 512, 4), (16, 256, 4), (16, 512, 8), (32, 256, 8), (8, 256, 2), (16, 256, 8))
_head = _autotuned(_head_kernel, [triton.Config({"BN": bn, "BK": bk}, num_stages=stages, num_warps=warps)
                                  for bn, bk, stages, warps in HEAD_TILES], ["R", "V", "D"])
_head_gemv = _autotuned(_head_gemv_kernel, [triton.Config({"BN": bn, "BK": bk}, num_warps=warps)
                                            for bn, bk, warps in HEAD_GEMV_TILES], ["V", "D"])


def head(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Logits float32 [R, V] of hidden states h float32 [R, D] and the head w float16 [V, D]:
    one row streams the head through float32 products, more go through tensor-core dots of h
    split in two float16 halves."""
    r, d = h.shape
    v = w.shape[0]
    out = torch.empty((r, v), dtype=torch.float32, device=h.device)
    if r == 1:
        tile = {"BN": 16, "BK": 256, "num_warps": 4} if INTERPRET else {}
        _launch(_head_gemv, lambda meta: (triton.cdiv(v, meta["BN"]),), h, w, out, v, d, **tile, pdl=True)
        return out
    bm = 16 if r <= 16 else 64
    tile = {"BN": 128, "BK": 32, "num_warps": 4} if INTERPRET else {}
    _launch(_head, lambda meta: (triton.cdiv(v, meta["BN"]), triton.cdiv(r, bm)), h, w, out, r, v, d, BM=bm,
            **tile)
    return out


def tuned() -> dict:
    """The tiles the autotuned kernels chose, per key (for the benchmark's report)."""
    return {name: {str(key): str(config) for key, config in kernel.cache.items()}
            for name, kernel in (("gemv", _gemv), ("head", _head), ("head_gemv", _head_gemv))
            if isinstance(kernel, triton.runtime.Autotuner)}
