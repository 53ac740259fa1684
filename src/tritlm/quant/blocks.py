"""Reference of the non-ternary block formats found in ternary-model files, and float widening.

- Q8_0  32-element blocks, 34 bytes: f16 `d`, then 32 int8 `q`. Value = q * d.
- Q6_K  256-element blocks, 210 bytes: `ql[128]` (low 4 bits), `qh[64]` (high 2 bits),
        `scales[16]` (int8, one per 16 elements), f16 `d`. Value = (d * scale) * (q - 32).
- F16 / BF16: half floats; BF16 is the top half of an f32.

`shape` is the NumPy shape (last axis = row length); `data` the tensor's flat uint8 bytes.
"""

import math

import numpy as np

QK8_0 = 32
Q8_0_BLOCK_BYTES = 2 + QK8_0
QK_K = 256
Q6_K_BLOCK_BYTES = QK_K // 2 + QK_K // 4 + QK_K // 16 + 2


def _blocks(data, shape, block: int, block_bytes: int, name: str) -> np.ndarray:
    shape = tuple(shape)
    if not shape or shape[-1] % block:
        raise ValueError(f"{name}: row length of shape {shape} must be a multiple of {block}")
    data = np.asarray(data)
    nbytes = math.prod(shape) // block * block_bytes
    if data.dtype != np.uint8 or data.ndim != 1 or data.size != nbytes:
        raise ValueError(f"{name}: shape {shape} needs {nbytes} flat uint8 bytes, "
                         f"got {data.dtype} {data.shape}")
    return data.reshape(-1, block_bytes)


def _f16(columns: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 columns -> (n, 1) float32 (a copy first: the slice is not contiguous)."""
    return np.ascontiguousarray(columns).view("<f2").astype(np.float32)


# ----------------------------------------------------------------------------------- floats

def f16_to_f32(data) -> np.ndarray:
    """float16 bits (uint16 array, or flat uint8 bytes) -> float32, same shape as the uint16s."""
    return np.asarray(data).view("<f2").astype(np.float32)


def bf16_to_f32(data) -> np.ndarray:
    """bfloat16 bits (uint16 array, or flat uint8 bytes) -> float32: they become its top half."""
    return (np.asarray(data).view("<u2").astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even as ggml does; NaN stays a
    (quiet) NaN instead of rounding into infinity."""
    n = np.asarray(x, dtype=np.float32).view(np.uint32)
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    # adding 0x7fff + lsb rounds half to even; it cannot overflow uint32 for non-NaN n
    rounded = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    return np.where(nan, (n >> 16) | 0x40, rounded).astype(np.uint16)


# ------------------------------------------------------------------------------------- Q8_0

def dequantize_q8_0(data, shape) -> np.ndarray:
    blocks = _blocks(data, shape, QK8_0, Q8_0_BLOCK_BYTES, "Q8_0")
    d = _f16(blocks[:, :2])
    q = blocks[:, 2:].view(np.int8).astype(np.float32)
    return (q * d).reshape(shape)


def quantize_q8_0(x) -> np.ndarray:
    """float32 [..., K] -> flat Q8_0 bytes, as ggml's reference quantizer: d = max|x| / 127,
    q = round_half_away(x / d) computed with the f32 inverse of d (before d is stored as f16)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % QK8_0:
        raise ValueError(f"Q8_0: row length of shape {x.shape} must be a multiple of {QK8_0}")
    blocks = x.reshape(-1, QK8_0)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    v = blocks * inv
    # C roundf: halves away from zero (np.rint would round them to even)
    t = np.trunc(v)
    q = t + np.where(np.abs(v - t) >= 0.5, np.sign(v), np.float32(0))
    scale = d.astype("<f2").view(np.uint8)
    return np.concatenate([scale, q.astype(np.int8).view(np.uint8)], axis=1).reshape(-1)


# ------------------------------------------------------------------------------------- Q6_K

def dequantize_q6_k(data, shape) -> np.ndarray:
    blocks = _blocks(data, shape, QK_K, Q6_K_BLOCK_BYTES, "Q6_K")
    n = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(blocks[:, 208:])
    # Each 128-element half h uses ql[64h : 64h+64] and qh[32h : 32h+32]. Element 32g + l of
    # the half (g = 0..3, l = 0..31) takes the low bits from nibble g // 2 of ql byte
    # 32 * (g % 2) + l, and the high bits from qh byte l at shift 2g.
    ql = ql.reshape(n, 2, 1, 2, 32)
    low = (ql >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1, 1)) & 0xF  # (n, h, g//2, g%2, l)
    high = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low.reshape(n, 2, 4, 32) | (high << 4)).astype(np.float32) - 32
    # one scale per 16 consecutive elements; ggml multiplies (d * scale) first, then q
    return ((d * scales)[:, :, None] * q.reshape(n, 16, 16)).reshape(shape)
