// AVX2 kernels (Haswell / Zen 1 and later). A 64-byte chunk is two registers: rows 0-7 and
// rows 8-15. vpmaddubsw multiplies codes (0..2) by activations and adds pairs into int16
// (|pair| <= 512, never saturating); the four planes' pairs are added in int16 (|sum| <= 2048)
// and widened to int32 once per chunk, so the running sums are int32 at any K.
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

inline void store_tile(const Gemm& g, int64_t tile, int64_t t, __m256i lo, __m256i hi) {
  const int64_t m0 = tile * kTileRows;
  const int64_t rows = g.M - m0 < kTileRows ? g.M - m0 : kTileRows;
  alignas(32) int32_t sums[kTileRows];
  _mm256_store_si256(reinterpret_cast<__m256i*>(sums), lo);
  _mm256_store_si256(reinterpret_cast<__m256i*>(sums + 8), hi);
  for (int64_t r = 0; r < rows; ++r) {
    if (g.sums)
      g.sums[t * g.M + m0 + r] = sums[r];
    else
      g.out[t * g.M + m0 + r] = rescale(sums[r], g.act_sum[t], g.act_scale[t], g.row_scale[m0 + r]);
  }
}

// Codes x activations of one half chunk (8 rows x 16 columns), summed per row into int32.
inline __m256i half_chunk(__m256i x, __m256i b0, __m256i b1, __m256i b2, __m256i b3) {
  const __m256i m = _mm256_set1_epi8(0x03);
  const __m256i p0 = _mm256_and_si256(x, m);
  const __m256i p1 = _mm256_and_si256(_mm256_srli_epi16(x, 2), m);
  const __m256i p2 = _mm256_and_si256(_mm256_srli_epi16(x, 4), m);
  const __m256i p3 = _mm256_and_si256(_mm256_srli_epi16(x, 6), m);
  const __m256i pairs = _mm256_add_epi16(
      _mm256_add_epi16(_mm256_maddubs_epi16(p0, b0), _mm256_maddubs_epi16(p1, b1)),
      _mm256_add_epi16(_mm256_maddubs_epi16(p2, b2), _mm256_maddubs_epi16(p3, b3)));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

// One token (decode): the activations of a chunk are broadcast once for both halves, and the
// weights are prefetched ahead.
void tile_one_token(const Gemm& g, int64_t tile, int64_t t0, const uint8_t* last) {
  const int64_t chunks = g.K / kChunkCols;
  const uint8_t* w = g.tiles + tile * chunks * kChunkBytes;
  const int8_t* q = g.q + t0 * g.K;
  __m256i lo = _mm256_setzero_si256(), hi = lo;
  for (int64_t s = 0; s < chunks; ++s, w += kChunkBytes, q += kChunkCols) {
    prefetch_ahead(w, last);
    const __m256i b0 = broadcast4(q), b1 = broadcast4(q + 4), b2 = broadcast4(q + 8), b3 = broadcast4(q + 12);
    lo = _mm256_add_epi32(lo, half_chunk(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), b0, b1, b2, b3));
    hi = _mm256_add_epi32(hi, half_chunk(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32)), b0, b1, b2, b3));
  }
  store_tile(g, tile, t0, lo, hi);
}

constexpr int kBlock = 4;  // tokens per pass: 2 halves x 4 tokens of accumulators fit 16 ymm

template <int T>
void tile_tokens(const Gemm& g, int64_t tile, int64_t t0, const uint8_t* last) {
  const int64_t chunks = g.K / kChunkCols;
  const uint8_t* w = g.tiles + tile * chunks * kChunkBytes;
  const int8_t* q = g.q + t0 * g.K;
  __m256i acc[2][T];
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < T; ++t) acc[h][t] = _mm256_setzero_si256();
  for (int64_t s = 0; s < chunks; ++s) {
    prefetch_ahead(w + s * kChunkBytes, last);
    for (int h = 0; h < 2; ++h) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + s * kChunkBytes + 32 * h));
      for (int t = 0; t < T; ++t) {
        const int8_t* qs = q + t * g.K + s * kChunkCols;
        acc[h][t] = _mm256_add_epi32(acc[h][t], half_chunk(x, broadcast4(qs), broadcast4(qs + 4),
                                                           broadcast4(qs + 8), broadcast4(qs + 12)));
      }
    }
  }
  for (int t = 0; t < T; ++t) store_tile(g, tile, t0 + t, acc[0][t], acc[1][t]);
}

constexpr BlockKernel kBlockKernels[kBlock + 1] = {nullptr, tile_one_token, tile_tokens<2>,
                                                   tile_tokens<3>, tile_tokens<4>};

void gemm_tiles(const Gemm& g, int64_t tile_begin, int64_t tile_end) {
  gemm_blocks(g, tile_begin, tile_end, kBlockKernels, kBlock);
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

}  // namespace tritlm
