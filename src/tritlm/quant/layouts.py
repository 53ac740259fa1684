"""Reference pack / unpack of every ternary layout tritlm reads or writes.

A ternary matrix travels as `ternary` (int8 [M, K], values -1/0/+1) and `scale` (float32 [M],
one per output row; the weight is ternary * scale). Files store unsigned codes = ternary + 1.

- I2_S   bitnet.cpp: 128-element blocks, 2-bit codes MSB first, one f32 scale in a 32-byte tail.
- TQ2_0  llama.cpp: 256-element blocks of 64 code bytes (LSB first) + f16 scale.
- TQ1_0  llama.cpp: 256-element blocks of 5 trits per byte (48 bytes) + 4 bytes + f16 scale.
- HF     Hugging Face packed uint8 [M/4, K]: bit pair 2i of row r holds row i*M/4 + r.
- tiles  tritlm's kernel layout: 16 rows x 16 columns per 64-byte chunk (see TILE_* below).
- tiles5 tritlm's 1.6-bit kernel layout: TQ1_0's byte order, 16 rows interleaved, five weights
         per byte in a code the AVX-512 kernel decodes with table lookups (see TILES5_* below).
"""

import numpy as np

I2S_BLOCK = 128
I2S_TAIL = 32
QK = 256  # TQ1_0 / TQ2_0 block
TQ2_0_BLOCK_BYTES = QK // 4 + 2
TQ1_0_BLOCK_BYTES = 48 + 4 + 2

# tiles: rows are grouped 16 at a time (the last group padded with zero weights); each group is
# a run of 64-byte chunks over K, 16 columns per chunk. Byte 4r + j of chunk s holds, at bit
# 2p, the code of row r, column 16s + 4p + j. One AVX-512 register is one chunk: 16 int32
# lanes = 16 rows, and the four 2-bit planes each pair with 4 consecutive activations.
TILE_ROWS = 16
TILE_COLS = 16
TILE_CHUNK_BYTES = 64


def _codes(ternary: np.ndarray) -> np.ndarray:
    t = np.asarray(ternary)
    if t.dtype != np.int8 or t.ndim != 2:
        raise ValueError(f"ternary weights must be int8 [M, K], got {t.dtype} {t.shape}")
    if t.size and (t.min() < -1 or t.max() > 1):
        raise ValueError("ternary weights must be -1, 0 or +1")
    return (t + 1).astype(np.uint8)


def _ternary(codes: np.ndarray, layout: str) -> np.ndarray:
    if (codes > 2).any():
        raise ValueError(f"{layout}: code 3 is not a ternary value")
    return codes.astype(np.int8) - 1


def row_scales(scale, m: int) -> np.ndarray:
    s = np.broadcast_to(np.asarray(scale, dtype=np.float32), (m,))
    if not (np.isfinite(s).all() and (s >= 0).all()):
        raise ValueError("weight scales must be finite and non-negative")
    return s


def _check_data(data: np.ndarray, nbytes: int, layout: str) -> np.ndarray:
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise ValueError(f"{layout}: data must be a flat uint8 array, got {data.dtype} {data.shape}")
    if data.size < nbytes:
        raise ValueError(f"{layout}: {data.size} bytes, the shape needs {nbytes}")
    return data


def _check_cols(shape, multiple: int, layout: str) -> tuple[int, int]:
    m, k = shape
    if k % multiple:
        raise ValueError(f"{layout}: row length K={k} must be a multiple of {multiple}")
    return m, k


# ---------------------------------------------------------------------------------------- I2_S

def i2s_nbytes(shape) -> int:
    return shape[0] * shape[1] // 4 + I2S_TAIL


def pack_i2s(ternary: np.ndarray, scale) -> np.ndarray:
    codes = _codes(ternary)
    _check_cols(codes.shape, I2S_BLOCK, "I2_S")
    scales = row_scales(scale, codes.shape[0])
    if scales.size and (scales != scales[0]).any():
        raise ValueError("I2_S holds one scale per tensor; the rows have different scales")
    # element j = 32g + p of a block sits in byte p at bit shift 6 - 2g
    blocks = codes.reshape(-1, 4, 32)
    packed = (blocks[:, 0] << 6) | (blocks[:, 1] << 4) | (blocks[:, 2] << 2) | blocks[:, 3]
    tail = np.zeros(I2S_TAIL, np.uint8)
    tail[:4] = np.frombuffer(np.float32(scales[0] if scales.size else 0).tobytes(), np.uint8)
    return np.concatenate([packed.reshape(-1), tail])


def unpack_i2s(data: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    m, k = _check_cols(shape, I2S_BLOCK, "I2_S")
    data = _check_data(data, i2s_nbytes(shape), "I2_S")
    n = m * k
    packed = data[: n // 4].reshape(-1, 1, 32)
    codes = (packed >> np.array([6, 4, 2, 0], np.uint8).reshape(1, 4, 1)) & 3
    scale = data[n // 4 : n // 4 + 4].view(np.float32)[0]
    return _ternary(codes.reshape(m, k), "I2_S"), np.full(m, scale, np.float32)


# ------------------------------------------------------------------------------ TQ2_0 / TQ1_0

def _block_scales(ternary: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """f16 scale of each 256-block: the row's scale, or 0 where the block is all zero (as the
    llama.cpp quantizer gives for max|x| = 0)."""
    m, k = ternary.shape
    nonzero = ternary.reshape(m, k // QK, QK).any(axis=2)
    d = np.where(nonzero, scales[:, None], 0).astype(np.float16)
    return d.reshape(-1, 1).view(np.uint8)


def _rows_from_block_scales(d: np.ndarray, m: int, layout: str) -> np.ndarray:
    """One scale per row from the per-block f16 scales; zero blocks carry no information."""
    d = d.astype(np.float32).reshape(m, -1)
    row = d.max(axis=1, initial=0.0)
    if ((d != 0) & (d != row[:, None])).any():
        raise ValueError(f"{layout}: block scales differ within a row; a ternary model has one "
                         "scale per row")
    return row


def tq2_0_nbytes(shape) -> int:
    return shape[0] * shape[1] // QK * TQ2_0_BLOCK_BYTES


def pack_tq2_0(ternary: np.ndarray, scale) -> np.ndarray:
    codes = _codes(ternary)
    _check_cols(codes.shape, QK, "TQ2_0")
    scales = row_scales(scale, codes.shape[0])
    # in each 128-element half: byte m holds elements m + 32n at bit 2n
    halves = codes.reshape(-1, 2, 4, 32)
    packed = halves[:, :, 0] | (halves[:, :, 1] << 2) | (halves[:, :, 2] << 4) | (halves[:, :, 3] << 6)
    blocks = np.concatenate([packed.reshape(-1, 64), _block_scales(ternary, scales)], axis=1)
    return blocks.reshape(-1)


def unpack_tq2_0(data: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    m, k = _check_cols(shape, QK, "TQ2_0")
    blocks = _check_data(data, tq2_0_nbytes(shape), "TQ2_0")[: tq2_0_nbytes(shape)]
    blocks = blocks.reshape(-1, TQ2_0_BLOCK_BYTES)
    packed = blocks[:, :64].reshape(-1, 2, 1, 32)
    codes = (packed >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    d = blocks[:, 64:].copy().view(np.float16)
    return _ternary(codes.reshape(m, k), "TQ2_0"), _rows_from_block_scales(d, m, "TQ2_0")


# TQ1_0 packs trits base 3: bytes 0..31 hold elements m + 32n (n = 0..4), bytes 32..47 hold
# elements 160 + m + 16n (n = 0..4), bytes 48..51 hold elements 240 + m + 4n (n = 0..3), the
# first trit most significant. A byte stores ceil(v * 256 / 243) of the base-3 number v, so that
# trit n comes back as the top byte of (uint8)(byte * 3**n) * 3.
_TQ1_GROUPS = ((0, 32, 5), (160, 16, 5), (240, 4, 4))  # (first element, bytes, trits per byte)


def tq1_0_nbytes(shape) -> int:
    return shape[0] * shape[1] // QK * TQ1_0_BLOCK_BYTES


def pack_tq1_0(ternary: np.ndarray, scale) -> np.ndarray:
    codes = _codes(ternary)
    _check_cols(codes.shape, QK, "TQ1_0")
    scales = row_scales(scale, codes.shape[0])
    blocks = codes.reshape(-1, QK).astype(np.uint16)
    parts = []
    for start, nbytes, trits in _TQ1_GROUPS:
        group = blocks[:, start : start + nbytes * trits].reshape(-1, trits, nbytes)
        powers = 3 ** np.arange(4, 4 - trits, -1, dtype=np.uint16)  # 81, 27, 9, 3[, 1]
        value = (group * powers[None, :, None]).sum(axis=1)
        parts.append(((value * 256 + 242) // 243).astype(np.uint8))
    parts.append(_block_scales(ternary, scales))
    return np.concatenate(parts, axis=1).reshape(-1)


def unpack_tq1_0(data: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    m, k = _check_cols(shape, QK, "TQ1_0")
    blocks = _check_data(data, tq1_0_nbytes(shape), "TQ1_0")[: tq1_0_nbytes(shape)]
    blocks = blocks.reshape(-1, TQ1_0_BLOCK_BYTES)
    groups, offset = [], 0
    for _, nbytes, trits in _TQ1_GROUPS:
        packed = blocks[:, offset : offset + nbytes].astype(np.uint16)
        shifted = (packed[:, None, :] * 3 ** np.arange(trits, dtype=np.uint16)[None, :, None]) & 0xFF
        groups.append(((shifted * 3) >> 8).reshape(-1, trits * nbytes))
        offset += nbytes
    codes = np.concatenate(groups, axis=1).astype(np.uint8)
    d = blocks[:, offset:].copy().view(np.float16)
    return _ternary(codes.reshape(m, k), "TQ1_0"), _rows_from_block_scales(d, m, "TQ1_0")


# ------------------------------------------------------------------------- HF packed uint8

def pack_hf(ternary: np.ndarray) -> np.ndarray:
    codes = _codes(ternary)
    m, k = codes.shape
    if m % 4:
        raise ValueError(f"HF packed weights need M multiple of 4, got {m}")
    quarters = codes.reshape(4, m // 4, k)
    return quarters[0] | (quarters[1] << 2) | (quarters[2] << 4) | (quarters[3] << 6)


def unpack_hf(packed: np.ndarray) -> np.ndarray:
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise ValueError(f"HF packed weights must be uint8 [M/4, K], got {packed.dtype} {packed.shape}")
    codes = (packed[None] >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1, 1)) & 3
    return _ternary(codes.reshape(-1, packed.shape[1]), "HF packed")


# ------------------------------------------------------------------------------------ tiles

def tiles_shape(shape) -> tuple[int, int, int]:
    m, k = shape
    return -(-m // TILE_ROWS), k // TILE_COLS, TILE_CHUNK_BYTES


def pack_tiles(ternary: np.ndarray) -> np.ndarray:
    codes = _codes(ternary)
    m, k = _check_cols(codes.shape, TILE_COLS, "tiles")
    n_tiles, n_chunks, _ = tiles_shape((m, k))
    padded = np.ones((n_tiles * TILE_ROWS, k), np.uint8)  # code 1 = weight 0
    padded[:m] = codes
    # (tile, r, chunk, p, j) -> (tile, chunk, r, j, p)
    t = padded.reshape(n_tiles, TILE_ROWS, n_chunks, 4, 4).transpose(0, 2, 1, 4, 3)
    packed = t[..., 0] | (t[..., 1] << 2) | (t[..., 2] << 4) | (t[..., 3] << 6)
    return np.ascontiguousarray(packed.reshape(n_tiles, n_chunks, TILE_CHUNK_BYTES))


def unpack_tiles(tiles: np.ndarray, shape) -> np.ndarray:
    m, k = _check_cols(shape, TILE_COLS, "tiles")
    n_tiles, n_chunks, _ = tiles_shape(shape)
    tiles = np.asarray(tiles)
    if tiles.dtype != np.uint8 or tiles.shape != (n_tiles, n_chunks, TILE_CHUNK_BYTES):
        raise ValueError(f"tiles for {shape} must be uint8 {(n_tiles, n_chunks, TILE_CHUNK_BYTES)}")
    planes = (tiles.reshape(n_tiles, n_chunks, TILE_ROWS, 4, 1)
              >> np.array([0, 2, 4, 6], np.uint8)) & 3  # (tile, chunk, r, j, p)
    codes = planes.transpose(0, 2, 1, 4, 3).reshape(n_tiles * TILE_ROWS, k)[:m]
    return _ternary(codes, "tiles")


# ----------------------------------------------------------------------------------- tiles5

# tiles5 keeps TQ1_0's order: byte m of a row's 256-column block holds the weights of columns
# _TQ1_COLUMNS[m] (m + 32n for m < 32, 160 + (m - 32) + 16n for m < 48, 240 + (m - 48) + 4n for
# the last 4 bytes, which hold only 4 weights). Rows are grouped 16 at a time as in `tiles`, and
# each group is a run of 13 64-byte chunks per block: byte 4r + j of chunk i holds byte 4i + j of
# row r's block. So in one chunk, weight n of 16 rows x 4 bytes pairs with 4 consecutive columns.
#
# The byte code is not TQ1_0's base-3 number, whose digits cost AVX-512 10 to 20 cycles per 64
# bytes to extract (docs/KERNELS.md), but one chosen so that each weight is one or two 64-entry
# lookups (vpermb, about 6 cycles per 64 bytes) of 6 of the byte's bits: with lo = x & 63 and
# hi = x >> 2,
#   code 0 = L[0][lo], code 1 = L[1][lo], code 2 = L[2][hi], code 3 = L[3][hi],
#   code 4 = L[4][lo] + L[5][hi].
# Tables with this property were found by a randomized search; every byte decodes to codes <= 2
# and every one of the 243 code tuples has a byte (13 have two; packing writes the smaller). A
# TQ1_0 tensor converts by a byte map and a shuffle (tiles5_from_tq1_0). Weight 4 of the 4-weight
# bytes is absent: packing stores code 0 there, as TQ1_0 does, and kernels skip it.
TILES5_BLOCK = QK  # columns per block
TILES5_CHUNKS = 13  # 64-byte chunks per block of a 16-row group: 52 bytes x 16 rows
TILES5_LOOKUP = np.array([[int(c) for c in row] for row in (
    "0210122012012100201011210200121011122101021202201002120021202221",
    "1021001101212210212012210002001012102201200122100210221200121120",
    "0011020010211202101102120110022121120021122111002202102221200022",
    "1001021112012111021221010012020022200210202210211000112202002112",
    "2200000211110000000000011000000010021111000000101101201011111021",
    "0011111001100010001111100000001000112010012000100010211001000010",
)], np.uint8)


def _tq1_columns() -> np.ndarray:
    """[52, 5]: the block column of weight n of byte m; -1 where a byte holds only 4."""
    columns, m = np.full((52, 5), -1), 0
    for start, nbytes, trits in _TQ1_GROUPS:
        columns[m : m + nbytes, :trits] = start + np.arange(nbytes)[:, None] + nbytes * np.arange(trits)
        m += nbytes
    return columns


_TQ1_COLUMNS = _tq1_columns()
_POWERS3 = 3 ** np.arange(4, -1, -1)  # a code tuple's index: c0 * 81 + c1 * 27 + ... + c4


def _tiles5_decode() -> np.ndarray:
    """[256, 5]: the five codes of every byte."""
    x = np.arange(256)
    lo, hi, lut = x & 63, x >> 2, TILES5_LOOKUP.astype(np.int64)
    codes = np.stack([lut[0][lo], lut[1][lo], lut[2][hi], lut[3][hi], lut[4][lo] + lut[5][hi]], axis=1)
    return codes.astype(np.uint8)


_TILES5_CODES = _tiles5_decode()
_TILES5_ENCODE = np.full(243, 255, np.uint8)  # code tuple index -> the smallest byte holding it
np.minimum.at(_TILES5_ENCODE, _TILES5_CODES @ _POWERS3, np.arange(256, dtype=np.uint8))


def _tq1_byte_codes() -> np.ndarray:
    """[256, 5]: the five codes TQ1_0 reads from each byte value."""
    shifted = (np.arange(256)[:, None] * 3 ** np.arange(5)) & 0xFF
    return (shifted * 3) >> 8


_TQ1_TO_TILES5 = _TILES5_ENCODE[_tq1_byte_codes() @ _POWERS3]


def tiles5_shape(shape) -> tuple[int, int, int]:
    m, k = shape
    return -(-m // TILE_ROWS), k // TILES5_BLOCK * TILES5_CHUNKS, TILE_CHUNK_BYTES


def _tiles5_arrange(blocks: np.ndarray, pad: np.ndarray) -> np.ndarray:
    """Rows of code bytes [M, K/256, 52] -> tiles, padded with `pad` [K/256, 52] rows."""
    m, n_blocks, _ = blocks.shape
    n_tiles = -(-m // TILE_ROWS)
    rows = np.empty((n_tiles * TILE_ROWS, n_blocks, 52), np.uint8)
    rows[:m], rows[m:] = blocks, pad
    # (tile, r, block, chunk, j) -> (tile, block, chunk, r, j)
    t = rows.reshape(n_tiles, TILE_ROWS, n_blocks, TILES5_CHUNKS, 4).transpose(0, 2, 3, 1, 4)
    return np.ascontiguousarray(t.reshape(n_tiles, n_blocks * TILES5_CHUNKS, TILE_CHUNK_BYTES))


def _tiles5_bytes(codes: np.ndarray) -> np.ndarray:
    """Codes [M, K] -> code bytes [M, K/256, 52] in TQ1_0's byte order."""
    blocks = codes.reshape(codes.shape[0], -1, QK)
    index = np.zeros(blocks.shape[:2] + (52,), np.uint8)  # the code tuple's index, < 243
    for n in range(5):
        present = _TQ1_COLUMNS[:, n] >= 0  # an absent code counts as 0, as TQ1_0 stores it
        digit = np.zeros_like(index)
        digit[:, :, present] = blocks[:, :, _TQ1_COLUMNS[present, n]]
        index = index * 3 + digit
    return _TILES5_ENCODE[index]


def pack_tiles5(ternary: np.ndarray) -> np.ndarray:
    codes = _codes(ternary)
    m, k = _check_cols(codes.shape, TILES5_BLOCK, "tiles5")
    return _tiles5_arrange(_tiles5_bytes(codes), _tiles5_bytes(np.ones((1, k), np.uint8))[0])


def unpack_tiles5(tiles: np.ndarray, shape) -> np.ndarray:
    m, k = _check_cols(shape, TILES5_BLOCK, "tiles5")
    n_tiles, n_chunks, _ = tiles5_shape(shape)
    tiles = np.asarray(tiles)
    if tiles.dtype != np.uint8 or tiles.shape != (n_tiles, n_chunks, TILE_CHUNK_BYTES):
        raise ValueError(f"tiles5 for {shape} must be uint8 {(n_tiles, n_chunks, TILE_CHUNK_BYTES)}")
    n_blocks = k // TILES5_BLOCK
    # (tile, block, chunk, r, j) -> (tile, r, block, chunk, j): rows of 52 bytes per block
    rows = tiles.reshape(n_tiles, n_blocks, TILES5_CHUNKS, TILE_ROWS, 4).transpose(0, 3, 1, 2, 4)
    codes5 = _TILES5_CODES[rows.reshape(n_tiles * TILE_ROWS, n_blocks, 52)[:m]]  # [m, blocks, 52, 5]
    present = _TQ1_COLUMNS >= 0
    codes = np.empty((m, n_blocks, QK), np.uint8)
    codes[:, :, _TQ1_COLUMNS[present]] = codes5[:, :, present]
    return _ternary(codes.reshape(m, k), "tiles5")


def tiles5_from_tq1_0(data: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """tiles5 and per-row scales from the bytes of a TQ1_0 tensor: a byte map and a shuffle."""
    m, k = _check_cols(shape, QK, "TQ1_0")
    blocks = _check_data(data, tq1_0_nbytes(shape), "TQ1_0")[: tq1_0_nbytes(shape)]
    blocks = blocks.reshape(m, k // QK, TQ1_0_BLOCK_BYTES)
    scale = _rows_from_block_scales(blocks[:, :, 52:].copy().view(np.float16), m, "TQ1_0")
    pad = _tiles5_bytes(np.ones((1, k), np.uint8))[0]
    return _tiles5_arrange(_TQ1_TO_TILES5[blocks[:, :, :52]], pad), scale


# ------------------------------------------------------------------------------ conversion

FILE_LAYOUTS = {
    "I2_S": (pack_i2s, unpack_i2s),
    "TQ2_0": (pack_tq2_0, unpack_tq2_0),
    "TQ1_0": (pack_tq1_0, unpack_tq1_0),
}


def convert(data: np.ndarray, shape, source: str, target: str) -> np.ndarray:
    """Re-encode a tensor between the file layouts that carry their own scale."""
    try:
        _, unpack = FILE_LAYOUTS[source]
        pack, _ = FILE_LAYOUTS[target]
    except KeyError as e:
        raise ValueError(f"unknown layout {e.args[0]!r}; known: {', '.join(FILE_LAYOUTS)}") from None
    return pack(*unpack(data, shape))
