"""Reference arithmetic of BitNet b1.58: weight ternarization, activation quantization, matmul.

Plain NumPy, written to be read. Every C++ kernel must reproduce these results bit for bit.
"""

import numpy as np

ACT_MAX_FLOOR = 1e-5  # bitnet.cpp's floor on max|x|, so an all-zero row gets a finite scale
WEIGHT_MEAN_FLOOR = 1e-5


def ternarize(weights: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Absmean quantization: ternary = clamp(round_half_even(W / gamma), -1, 1), gamma = mean|W|."""
    w = np.asarray(weights, dtype=np.float32)
    gamma = np.float32(max(float(np.abs(w, dtype=np.float64).mean()), WEIGHT_MEAN_FLOOR))
    ternary = np.clip(np.rint(w / gamma), -1, 1).astype(np.int8)
    return ternary, gamma


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row int8 quantization as bitnet.cpp does it.

    Returns (q int8[N, K], scale float32[N], row_sum int32[N]) with q = clamp(rint(x * scale)),
    scale = (float)(127 / max(1e-5, max|x|)) computed in double, row_sum = sum(q).
    """
    x = np.asarray(x)
    if x.dtype != np.float32 or x.ndim != 2:
        raise ValueError(f"activations must be float32 [tokens, K], got {x.dtype} {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("activations contain NaN or infinity")
    amax = np.abs(x).max(axis=1, initial=0.0).astype(np.float64)
    scale = (127.0 / np.maximum(amax, ACT_MAX_FLOOR)).astype(np.float32)
    q = np.clip(np.rint(x * scale[:, None]), -128, 127).astype(np.int8)
    return q, scale, q.sum(axis=1, dtype=np.int32)


def code_sums(ternary: np.ndarray, q: np.ndarray) -> np.ndarray:
    """S[n, m] = sum_k code[m, k] * q[n, k] with the unsigned codes 0/1/2 = ternary + 1.

    Computed in float64, which is exact here: every partial sum is an integer below 2**53.
    """
    codes = ternary.astype(np.float64) + 1.0
    sums = q.astype(np.float64) @ codes.T
    if np.abs(sums).max(initial=0) >= 2**31:
        raise ValueError("sum overflows int32")
    return sums.astype(np.int32)


def ternary_matmul(ternary: np.ndarray, row_scale, q: np.ndarray, act_scale: np.ndarray,
                   act_sum: np.ndarray) -> np.ndarray:
    """y[n, m] = ((float)S - (float)A) / act_scale * row_scale, every step in float32.

    S - A equals sum(ternary * q): the codes are the ternary values shifted by one.
    """
    m = ternary.shape[0]
    row_scale = np.broadcast_to(np.asarray(row_scale, dtype=np.float32), (m,))
    sums = code_sums(ternary, q).astype(np.float32)
    return (sums - act_sum.astype(np.float32)[:, None]) / act_scale[:, None] * row_scale[None, :]
