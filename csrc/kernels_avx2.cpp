// AVX2 kernels (Haswell / Zen 1 and later). A 64-byte chunk is two registers: rows 0-7 and
// rows 8-15. vpmaddubsw multiplies codes (0..2) by activations and adds pairs into int16
// (|pair| <= 512, never saturating); pairs are added in int16 over as many chunks as stay exact
// and then widened to int32, so the running sums are int32 at any K.
#include <immintrin.h>

#include <cstring>

#include "kernels.h"

namespace tritlm {
namespace {

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

inline int32_t reduce_add(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Rows m0 .. m0 + 7 of token t: the raw sums, or the epilogue with rescale's float operations in
// rescale's order, 8 rows at a time.
inline void store_rows(const Gemm& g, int64_t t, int64_t m0, __m256i sums) {
  if (g.sums) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(g.sums + t * g.M + m0), sums);
    return;
  }
  const __m256 diff = _mm256_sub_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(float(g.act_sum[t])));
  const __m256 y = _mm256_mul_ps(_mm256_div_ps(diff, _mm256_set1_ps(g.act_scale[t])), _mm256_loadu_ps(g.row_scale + m0));
  _mm256_storeu_ps(g.out + t * g.M + m0, y);
}

inline void store_tile(const Gemm& g, int64_t tile, int64_t t, __m256i lo, __m256i hi) {
  const int64_t m0 = tile * kTileRows;
  const int64_t rows = g.M - m0 < kTileRows ? g.M - m0 : kTileRows;
  if (rows == kTileRows) {
    store_rows(g, t, m0, lo);
    store_rows(g, t, m0 + 8, hi);
    return;
  }
  alignas(32) int32_t sums[kTileRows];  // the last tile, short of rows
  _mm256_store_si256(reinterpret_cast<__m256i*>(sums), lo);
  _mm256_store_si256(reinterpret_cast<__m256i*>(sums + 8), hi);
  for (int64_t r = 0; r < rows; ++r) {
    if (g.sums)
      g.sums[t * g.M + m0 + r] = sums[r];
    else
      g.out[t * g.M + m0 + r] = rescale(sums[r], g.act_sum[t], g.act_scale[t], g.row_scale[m0 + r]);
  }
}

// The int16 pairs of up to kWiden chunks are summed before widening to int32, which saves most
// of the non-multiply work per chunk.
constexpr int64_t kWiden = 8;

inline __m256i widen(__m256i pairs) { return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)); }

// One token (decode): bandwidth-bound where the multiplies keep up. A half chunk (8 rows x 16
// columns) is read with one 16-bit shift instead of three (Zen 1 and 2 shift on one port): x and
// x >> 4, each masked to bits 0-1 (plane 0 or 2: the codes) and to bits 2-3 (plane 1 or 3: four
// times the codes). The four-fold planes' products go to int16 sums of their own, divided by 4
// (exactly: an arithmetic shift of a multiple of 4) before widening. Over kWiden chunks the sums
// stay in int16: four-fold in [8 x 2 x -2048, 8 x 2 x 2032], plain in [8 x 2 x -512, 8 x 2 x 508],
// their total in [-16384, 16256].
void tile_one_token(const Gemm& g, int64_t tile, int64_t t0, const uint8_t* last) {
  const __m256i codes = _mm256_set1_epi8(0x03), fourfold = _mm256_set1_epi8(0x0c);
  const int64_t chunks = g.K / kChunkCols;
  const uint8_t* w = g.tiles + tile * chunks * kChunkBytes;
  const int8_t* q = g.q + t0 * g.K;
  __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  for (int64_t s0 = 0; s0 < chunks; s0 += kWiden) {
    const int64_t s1 = s0 + kWiden < chunks ? s0 + kWiden : chunks;
    __m256i plain[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}, four[2] = {plain[0], plain[1]};
    for (int64_t s = s0; s < s1; ++s) {
      prefetch_ahead(w + s * kChunkBytes, last);
      const int8_t* qs = q + s * kChunkCols;
      const __m256i b0 = broadcast4(qs), b1 = broadcast4(qs + 4), b2 = broadcast4(qs + 8), b3 = broadcast4(qs + 12);
      for (int h = 0; h < 2; ++h) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + s * kChunkBytes + 32 * h));
        const __m256i x4 = _mm256_srli_epi16(x, 4);
        plain[h] = _mm256_add_epi16(plain[h], _mm256_maddubs_epi16(_mm256_and_si256(x, codes), b0));
        four[h] = _mm256_add_epi16(four[h], _mm256_maddubs_epi16(_mm256_and_si256(x, fourfold), b1));
        plain[h] = _mm256_add_epi16(plain[h], _mm256_maddubs_epi16(_mm256_and_si256(x4, codes), b2));
        four[h] = _mm256_add_epi16(four[h], _mm256_maddubs_epi16(_mm256_and_si256(x4, fourfold), b3));
      }
    }
    for (int h = 0; h < 2; ++h)
      acc[h] = _mm256_add_epi32(acc[h], widen(_mm256_add_epi16(plain[h], _mm256_srai_epi16(four[h], 2))));
  }
  store_tile(g, tile, t0, acc[0], acc[1]);
}

// Several tokens (prefill, batched decode): compute-bound. Per 32 byte-products the floor is one
// vpmaddubsw and one int16 add; everything else is overhead to remove:
// - each token's 4-byte activation groups are broadcast once per K slab into a scratch in L1,
//   which vpmaddubsw then reads as a folded memory operand (a register broadcast costs a shuffle
//   uop on Zen, once per plane and token);
// - the slab passes over a group of row tiles, R half tiles (8 rows each) at a time for T tokens:
//   R x T int16 accumulators, R planes, the mask and a product fit in 16 registers (no spills),
//   and each half chunk's 4 planes are decoded once for all T tokens. R = 1 up to 8 tokens
//   (decoding costs a quarter of a uop per vpmaddubsw), R = 2 for 2-4 tokens (twice the
//   independent chains of adds);
// - int16 sums are widened to int32 every 16 chunks.
constexpr int kSlabTokens = 8;
constexpr int64_t kExactChunks = 16;  // int16 sums of 16 chunks lie in [16 x -2048, 16 x 2032]
constexpr int64_t kGroupTiles = 32;   // tiles that reuse one slab of broadcast activations

// Chunks per slab: 16 KB of broadcast activations (L1 holds them beside the streaming weights).
template <int T>
constexpr int64_t kSlabChunks = 16384 / (T * 4 * 32) / kExactChunks * kExactChunks;

// act[(c * T + t) * 4 + p] = token t's activations 16c + 4p .. 16c + 3, repeated over 32 bytes,
// for n chunks (q at token 0's first column of the slab).
template <int T>
void broadcast_slab(const int8_t* q, int64_t K, int64_t n, __m256i* act) {
  for (int64_t c = 0; c < n; ++c)
    for (int t = 0; t < T; ++t)
      for (int p = 0; p < 4; ++p) *act++ = broadcast4(q + t * K + c * kChunkCols + 4 * p);
}

// sums[(2i + h) * T + t] += half tile h of tile i (at w + i * tile_bytes + 32h) x token t, over the
// n chunks of the slab.
template <int R, int T>
void slab_pass(const uint8_t* w, int64_t tile_bytes, int64_t tiles, const __m256i* act_slab, int64_t n,
               __m256i* sums) {
  const __m256i m = _mm256_set1_epi8(0x03);
  for (int64_t i = 0; i < tiles; ++i)
    for (int h0 = 0; h0 < 2; h0 += R) {
      const uint8_t* wh = w + i * tile_bytes + 32 * h0;
      const __m256i* act = act_slab;
      __m256i* s = sums + (2 * i + h0) * T;
      for (int64_t c0 = 0; c0 < n; c0 += kExactChunks) {
        const int64_t c1 = c0 + kExactChunks < n ? c0 + kExactChunks : n;
        __m256i acc[R][T];  // (every loop over r and t unrolled: then GCC keeps acc in registers)
#pragma GCC unroll 2
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
          for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_si256();
        for (int64_t c = c0; c < c1; ++c, act += 4 * T) {
          // The weights come in runs of one slab per tile, which the hardware prefetcher does
          // not follow from memory: fetch the next tile's run into L1 and one 4 tiles on into L2
          // (past this thread's tiles that is wasted, never wrong: a prefetch cannot fault).
          if (h0 == 0) {
            __builtin_prefetch(wh + tile_bytes + c * kChunkBytes, 0, 3);
            __builtin_prefetch(wh + 4 * tile_bytes + c * kChunkBytes, 0, 1);
          }
#pragma GCC unroll 4
          for (int p = 0; p < 4; ++p) {
            __m256i plane[R];
#pragma GCC unroll 2
            for (int r = 0; r < R; ++r) {
              const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wh + c * kChunkBytes + 32 * r));
              plane[r] = _mm256_and_si256(_mm256_srli_epi16(x, 2 * p), m);
            }
#pragma GCC unroll 8
            for (int t = 0; t < T; ++t) {
              const __m256i a = _mm256_load_si256(act + 4 * t + p);
#pragma GCC unroll 2
              for (int r = 0; r < R; ++r) {
                acc[r][t] = _mm256_add_epi16(acc[r][t], _mm256_maddubs_epi16(plane[r], a));
                // keeps GCC from reassociating the adds into trees of live products, which spills
                __asm__("" : "+x"(acc[r][t]));
              }
            }
          }
        }
#pragma GCC unroll 2
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
          for (int t = 0; t < T; ++t) s[r * T + t] = _mm256_add_epi32(s[r * T + t], widen(acc[r][t]));
      }
    }
}

// tiles [tile0, tile0 + tiles) (tiles <= kGroupTiles) x tokens [t0, t0 + T).
template <int T>
void group_tokens(const Gemm& g, int64_t tile0, int64_t tiles, int64_t t0) {
  constexpr int R = T <= 4 ? 2 : 1;
  const int64_t chunks = g.K / kChunkCols, tile_bytes = chunks * kChunkBytes;
  __m256i act[kSlabChunks<T> * T * 4];
  __m256i sums[kGroupTiles * 2 * T];
  for (int64_t j = 0; j < tiles * 2 * T; ++j) sums[j] = _mm256_setzero_si256();
  for (int64_t c0 = 0; c0 < chunks; c0 += kSlabChunks<T>) {
    const int64_t n = chunks - c0 < kSlabChunks<T> ? chunks - c0 : kSlabChunks<T>;
    broadcast_slab<T>(g.q + t0 * g.K + c0 * kChunkCols, g.K, n, act);
    slab_pass<R, T>(g.tiles + tile0 * tile_bytes + c0 * kChunkBytes, tile_bytes, tiles, act, n, sums);
  }
  for (int64_t i = 0; i < tiles; ++i)
    for (int t = 0; t < T; ++t) store_tile(g, tile0 + i, t0 + t, sums[2 * i * T + t], sums[(2 * i + 1) * T + t]);
}

using GroupKernel = void (*)(const Gemm& g, int64_t tile0, int64_t tiles, int64_t t0);
constexpr GroupKernel kGroupKernels[kSlabTokens + 1] = {
    nullptr,           nullptr,           group_tokens<2>, group_tokens<3>, group_tokens<4>,
    group_tokens<5>,   group_tokens<6>,   group_tokens<7>, group_tokens<8>};

// Tiles in groups of at most kGroupTiles and tokens in blocks of at most kSlabTokens, both as even
// as possible (9 tokens: 5 + 4, not 8 + 1); group_kernels[T] computes a group for T tokens.
void gemm_tokens(const Gemm& g, int64_t tile_begin, int64_t tile_end, const GroupKernel* group_kernels) {
  const int64_t blocks = (g.n_tokens + kSlabTokens - 1) / kSlabTokens;
  const int64_t groups = (tile_end - tile_begin + kGroupTiles - 1) / kGroupTiles;
  for (int64_t j = 0; j < groups; ++j) {
    const int64_t tile0 = tile_begin + (tile_end - tile_begin) * j / groups;
    const int64_t tiles = tile_begin + (tile_end - tile_begin) * (j + 1) / groups - tile0;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t t0 = g.n_tokens * b / blocks, t1 = g.n_tokens * (b + 1) / blocks;
      group_kernels[t1 - t0](g, tile0, tiles, t0);
    }
  }
}

// tiles5. AVX2 has no 64-entry byte lookup, so each takes four 16-entry vpshufb and three
// blends on index bits 4 and 5. The three lookups of the low 6 bits share one table, packed as
// code 0 | code 1 << 2 | L[4] << 6, and likewise for the high 6 bits (code 2, code 3, L[5]).
struct Lookup5 {
  __m256i lo[4], hi[4];  // 64-entry tables as 4 x 16 entries, in both 128-bit lanes

  Lookup5() {
    const auto& L = kTiles5Lookup.t;
    alignas(32) uint8_t lo_bytes[64], hi_bytes[64];
    for (int i = 0; i < 64; ++i) {
      lo_bytes[i] = uint8_t(L[0][i] | L[1][i] << 2 | L[4][i] << 6);
      hi_bytes[i] = uint8_t(L[2][i] | L[3][i] << 2 | L[5][i] << 6);
    }
    for (int k = 0; k < 4; ++k) {
      lo[k] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(lo_bytes + 16 * k)));
      hi[k] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(hi_bytes + 16 * k)));
    }
  }
};

// t[idx] for indices 0..63 (bit 7 must be clear: vpshufb zeroes those bytes).
inline __m256i lookup64(const __m256i t[4], __m256i idx) {
  const __m256i bit4 = _mm256_slli_epi16(idx, 3), bit5 = _mm256_slli_epi16(idx, 2);  // to bit 7 of each byte
  // GCC turns a blend mask used twice into a compare (mask < 0) plus two blends: an opaque copy
  // keeps each mask to one blend, which reads bit 7 itself
  __m256i bit4_copy = bit4;
  __asm__("" : "+x"(bit4_copy));
  const __m256i r01 = _mm256_blendv_epi8(_mm256_shuffle_epi8(t[0], idx), _mm256_shuffle_epi8(t[1], idx), bit4);
  const __m256i r23 = _mm256_blendv_epi8(_mm256_shuffle_epi8(t[2], idx), _mm256_shuffle_epi8(t[3], idx), bit4_copy);
  return _mm256_blendv_epi8(r01, r23, bit5);
}

// The five code planes of 32 bytes (8 rows of a chunk).
inline void decode5(const Lookup5& L, __m256i x, __m256i p[5]) {
  const __m256i m63 = _mm256_set1_epi8(63), m3 = _mm256_set1_epi8(3), top = _mm256_set1_epi8(char(0xC0));
  const __m256i lo = lookup64(L.lo, _mm256_and_si256(x, m63));
  const __m256i hi = lookup64(L.hi, _mm256_and_si256(_mm256_srli_epi16(x, 2), m63));
  p[0] = _mm256_and_si256(lo, m3);
  p[1] = _mm256_and_si256(_mm256_srli_epi16(lo, 2), m3);
  p[2] = _mm256_and_si256(hi, m3);
  p[3] = _mm256_and_si256(_mm256_srli_epi16(hi, 2), m3);
  // L[4] + L[5] <= 2 in bits 6-7: the byte sum carries out of neither
  p[4] = _mm256_srli_epi16(_mm256_add_epi8(_mm256_and_si256(lo, top), _mm256_and_si256(hi, top)), 6);
}

// One token (decode): each half chunk is decoded and multiplied at once; per chunk the planes'
// vpmaddubsw pairs (|pair| <= 512) are added in int16 (|sum| <= 2560) and widened to int32.
void tile5_one_token(const Gemm& g, int64_t tile, int64_t t0, const uint8_t* last) {
  static const Lookup5 lookup;
  const Lookup5 L = lookup;
  const int64_t blocks = g.K / kBlock5Cols;
  const uint8_t* w = g.tiles + tile * blocks * kBlock5Bytes;
  const int8_t* q = g.q + t0 * g.K;
  __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  for (int64_t b = 0; b < blocks; ++b, q += kBlock5Cols) {
    for (int i = 0; i < kBlock5Chunks; ++i, w += kChunkBytes) {
      prefetch_ahead(w, last);
      const int planes = i < kBlock5Chunks - 1 ? 5 : 4;  // bytes 48..51 hold 4 codes
      for (int h = 0; h < 2; ++h) {
        __m256i p[5];
        decode5(L, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * h)), p);
        __m256i pairs = _mm256_setzero_si256();
        for (int n = 0; n < planes; ++n)
          pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(p[n], broadcast4(q + tq1_column(4 * i, n))));
        acc[h] = _mm256_add_epi32(acc[h], widen(pairs));
      }
    }
  }
  store_tile(g, tile, t0, acc[0], acc[1]);
}

// Several tokens: as for tiles (broadcast activations in L1, R half tiles x T tokens per pass),
// except that decoding takes more registers than the multiplications leave, so each 256-column
// block of a tile is first decoded into 130 planes in L1, which the passes then load. int16 sums
// of a block are exact: its 64 vpmaddubsw pairs lie in [64 x -512, 64 x 508].
template <int T>
constexpr int64_t kSlabBlocks = kSlabTokens / T;  // (at most 8 x 13 x 5 x 32 bytes = 16.6 KB)

// act[((b * 13 + i) * T + t) * 5 + n] = the 4 activations of token t that code plane n of chunk i
// of block b pairs with, repeated over 32 bytes (chunk 12 has no plane 4), for nb blocks.
template <int T>
void broadcast_slab5(const int8_t* q, int64_t K, int64_t nb, __m256i* act) {
  for (int64_t b = 0; b < nb; ++b)
    for (int i = 0; i < kBlock5Chunks; ++i)
      for (int t = 0; t < T; ++t, act += 5)
        for (int n = 0; n < (i < kBlock5Chunks - 1 ? 5 : 4); ++n)
          act[n] = broadcast4(q + t * K + b * kBlock5Cols + tq1_column(4 * i, n));
}

// acc[r][t] += the NP planes of half chunk r (planes[5r + n]) x token t (act[5t + n]).
template <int R, int T, int NP>
inline void chunk5(const __m256i* planes, const __m256i* act, __m256i (&acc)[R][T]) {
#pragma GCC unroll 5
  for (int n = 0; n < NP; ++n) {
    __m256i p[R];
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) {
      p[r] = planes[5 * r + n];
      __asm__("" : "+x"(p[r]));  // one load for T tokens (GCC would load it again for each)
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      __m256i a = act[5 * t + n];
      if (R > 1) __asm__("" : "+x"(a));  // one load for both halves
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) {
        acc[r][t] = _mm256_add_epi16(acc[r][t], _mm256_maddubs_epi16(p[r], a));
        __asm__("" : "+x"(acc[r][t]));  // (see slab_pass)
      }
    }
  }
}

// sums[(2i + h) * T + t] += half tile h of tile i x token t over the nb blocks of the slab.
template <int R, int T>
void slab5_pass(const uint8_t* w, int64_t tile_bytes, int64_t tiles, const __m256i* act, int64_t nb,
                __m256i* sums) {
  static const Lookup5 lookup;
  const Lookup5 L = lookup;
  __m256i planes[kBlock5Chunks * 2 * 5];  // [chunk][half][plane]
  for (int64_t i = 0; i < tiles; ++i)
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* wb = w + i * tile_bytes + b * kBlock5Bytes;
      for (int j = 0; j < kBlock5Chunks; ++j) {
        __builtin_prefetch(wb + tile_bytes + j * kChunkBytes, 0, 3);  // the next tiles (see slab_pass)
        __builtin_prefetch(wb + 4 * tile_bytes + j * kChunkBytes, 0, 1);
        for (int h = 0; h < 2; ++h)
          decode5(L, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * kChunkBytes + 32 * h)),
                  planes + (2 * j + h) * 5);
      }
      for (int h0 = 0; h0 < 2; h0 += R) {
        const __m256i* ab = act + b * kBlock5Chunks * T * 5;
        __m256i acc[R][T];
#pragma GCC unroll 2
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
          for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_si256();
        for (int j = 0; j < kBlock5Chunks - 1; ++j) chunk5<R, T, 5>(planes + (2 * j + h0) * 5, ab + j * T * 5, acc);
        chunk5<R, T, 4>(planes + (2 * kBlock5Chunks - 2 + h0) * 5, ab + (kBlock5Chunks - 1) * T * 5, acc);
        __m256i* s = sums + (2 * i + h0) * T;
#pragma GCC unroll 2
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
          for (int t = 0; t < T; ++t) s[r * T + t] = _mm256_add_epi32(s[r * T + t], widen(acc[r][t]));
      }
    }
}

// tiles [tile0, tile0 + tiles) (tiles <= kGroupTiles) x tokens [t0, t0 + T).
template <int T>
void group5_tokens(const Gemm& g, int64_t tile0, int64_t tiles, int64_t t0) {
  constexpr int R = T <= 4 ? 2 : 1;
  const int64_t blocks = g.K / kBlock5Cols, tile_bytes = blocks * kBlock5Bytes;
  __m256i act[kSlabBlocks<T> * kBlock5Chunks * T * 5];
  __m256i sums[kGroupTiles * 2 * T];
  for (int64_t j = 0; j < tiles * 2 * T; ++j) sums[j] = _mm256_setzero_si256();
  for (int64_t b0 = 0; b0 < blocks; b0 += kSlabBlocks<T>) {
    const int64_t nb = blocks - b0 < kSlabBlocks<T> ? blocks - b0 : kSlabBlocks<T>;
    broadcast_slab5<T>(g.q + t0 * g.K + b0 * kBlock5Cols, g.K, nb, act);
    slab5_pass<R, T>(g.tiles + tile0 * tile_bytes + b0 * kBlock5Bytes, tile_bytes, tiles, act, nb, sums);
  }
  for (int64_t i = 0; i < tiles; ++i)
    for (int t = 0; t < T; ++t) store_tile(g, tile0 + i, t0 + t, sums[2 * i * T + t], sums[(2 * i + 1) * T + t]);
}

constexpr GroupKernel kGroupKernels5[kSlabTokens + 1] = {
    nullptr,           nullptr,           group5_tokens<2>, group5_tokens<3>, group5_tokens<4>,
    group5_tokens<5>,  group5_tokens<6>,  group5_tokens<7>, group5_tokens<8>};

constexpr BlockKernel kOneToken[2] = {nullptr, tile_one_token};
constexpr BlockKernel kOneToken5[2] = {nullptr, tile5_one_token};

void gemm_tiles5(const Gemm& g, int64_t tile_begin, int64_t tile_end) {
  if (g.n_tokens == 1) return gemm_blocks(g, tile_begin, tile_end, kOneToken5, 1);
  gemm_tokens(g, tile_begin, tile_end, kGroupKernels5);
}

void gemm_tiles(const Gemm& g, int64_t tile_begin, int64_t tile_end) {
  if (g.layout == Layout::tiles5) return gemm_tiles5(g, tile_begin, tile_end);
  if (g.n_tokens == 1) return gemm_blocks(g, tile_begin, tile_end, kOneToken, 1);
  gemm_tokens(g, tile_begin, tile_end, kGroupKernels);
}

bool quantize_row(const float* x, int64_t k, int8_t* q, float* scale, int32_t* sum) {
  // max|x| on the bit patterns (see the AVX-512 file); NaN and infinity are >= 0x7f800000
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  __m256i amax = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8)
    amax = _mm256_max_epi32(amax, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), abs_mask));
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), amax);
  int32_t amax_bits = 0;
  for (int32_t v : lanes) amax_bits = v > amax_bits ? v : amax_bits;
  for (int64_t j = i; j < k; ++j) {
    int32_t bits;
    std::memcpy(&bits, x + j, 4);
    bits &= 0x7fffffff;
    amax_bits = bits > amax_bits ? bits : amax_bits;
  }
  if (amax_bits >= 0x7f800000) return false;
  float amax_f;
  std::memcpy(&amax_f, &amax_bits, 4);
  const float s = act_scale_from_max(amax_f);

  const __m256 vs = _mm256_set1_ps(s);
  const __m256i lo = _mm256_set1_epi32(-128), hi = _mm256_set1_epi32(127);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lane interleave
  __m256i total = _mm256_setzero_si256();
  i = 0;
  for (; i + 32 <= k; i += 32) {
    __m256i v[4];
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), vs));
      v[j] = _mm256_min_epi32(_mm256_max_epi32(v[j], lo), hi);
      total = _mm256_add_epi32(total, v[j]);
    }
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(bytes, order));
  }
  int32_t tail = 0;
  for (; i < k; ++i) {
    q[i] = int8_t(quantize_value(x[i], s));
    tail += q[i];
  }
  *scale = s;
  *sum = reduce_add(total) + tail;
  return true;
}

uint64_t read_bytes(const uint8_t* p, int64_t n) {
  __m256i a = _mm256_setzero_si256(), b = a;
  for (int64_t i = 0; i < n; i += 64) {
    a = _mm256_xor_si256(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    b = _mm256_xor_si256(b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
  }
  return uint64_t(_mm256_extract_epi64(_mm256_xor_si256(a, b), 0));
}

}  // namespace

KernelSet avx2_kernels() { return {"avx2", quantize_row, gemm_tiles, read_bytes}; }

void avx2_gemm_tiles5(const Gemm& g, int64_t tile_begin, int64_t tile_end) { gemm_tiles5(g, tile_begin, tile_end); }

}  // namespace tritlm
