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

// Codes x activations of one half chunk (8 rows x 16 columns), as int16 pairs: |pair| <= 2048.
inline __m256i half_chunk(__m256i x, __m256i b0, __m256i b1, __m256i b2, __m256i b3) {
  const __m256i m = _mm256_set1_epi8(0x03);
  const __m256i p0 = _mm256_and_si256(x, m);
  const __m256i p1 = _mm256_and_si256(_mm256_srli_epi16(x, 2), m);
  const __m256i p2 = _mm256_and_si256(_mm256_srli_epi16(x, 4), m);
  const __m256i p3 = _mm256_and_si256(_mm256_srli_epi16(x, 6), m);
  return _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(p0, b0), _mm256_maddubs_epi16(p1, b1)),
                          _mm256_add_epi16(_mm256_maddubs_epi16(p2, b2), _mm256_maddubs_epi16(p3, b3)));
}

// The int16 pairs of up to kWiden chunks are summed before widening to int32 (|sum| <= 8 x 2048
// = 16384), which saves two thirds of the non-multiply work per chunk.
constexpr int64_t kWiden = 8;

inline __m256i widen(__m256i pairs) { return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)); }

// T tokens (1 in decode): each half chunk is decoded once for every token, and the weights are
// prefetched ahead.
template <int T>
void tile_tokens(const Gemm& g, int64_t tile, int64_t t0, const uint8_t* last) {
  const int64_t chunks = g.K / kChunkCols;
  const uint8_t* w = g.tiles + tile * chunks * kChunkBytes;
  const int8_t* q = g.q + t0 * g.K;
  __m256i acc[2][T];
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < T; ++t) acc[h][t] = _mm256_setzero_si256();
  for (int64_t s0 = 0; s0 < chunks; s0 += kWiden) {
    const int64_t s1 = s0 + kWiden < chunks ? s0 + kWiden : chunks;
    __m256i pairs[2][T];
    for (int h = 0; h < 2; ++h)
      for (int t = 0; t < T; ++t) pairs[h][t] = _mm256_setzero_si256();
    for (int64_t s = s0; s < s1; ++s) {
      prefetch_ahead(w + s * kChunkBytes, last);
      for (int h = 0; h < 2; ++h) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + s * kChunkBytes + 32 * h));
        for (int t = 0; t < T; ++t) {
          const int8_t* qs = q + t * g.K + s * kChunkCols;
          pairs[h][t] = _mm256_add_epi16(pairs[h][t], half_chunk(x, broadcast4(qs), broadcast4(qs + 4),
                                                                 broadcast4(qs + 8), broadcast4(qs + 12)));
        }
      }
    }
    for (int h = 0; h < 2; ++h)
      for (int t = 0; t < T; ++t) acc[h][t] = _mm256_add_epi32(acc[h][t], widen(pairs[h][t]));
  }
  for (int t = 0; t < T; ++t) store_tile(g, tile, t0 + t, acc[0][t], acc[1][t]);
}

constexpr int kBlock = 4;  // tokens per pass

constexpr BlockKernel kBlockKernels[kBlock + 1] = {nullptr, tile_tokens<1>, tile_tokens<2>,
                                                   tile_tokens<3>, tile_tokens<4>};

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
  const __m256i r01 = _mm256_blendv_epi8(_mm256_shuffle_epi8(t[0], idx), _mm256_shuffle_epi8(t[1], idx), bit4);
  const __m256i r23 = _mm256_blendv_epi8(_mm256_shuffle_epi8(t[2], idx), _mm256_shuffle_epi8(t[3], idx), bit4);
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

// Each half chunk is decoded once and reused for T tokens; per chunk the planes' vpmaddubsw pairs
// (|pair| <= 512) are added in int16 (|sum| <= 2560) and widened to int32.
template <int T>
void tile5_tokens(const Gemm& g, int64_t tile, int64_t t0, const uint8_t* last) {
  static const Lookup5 lookup;
  const Lookup5 L = lookup;
  const int64_t blocks = g.K / kBlock5Cols;
  const uint8_t* w = g.tiles + tile * blocks * kBlock5Bytes;
  const int8_t* q = g.q + t0 * g.K;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[2][T];
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < T; ++t) acc[h][t] = _mm256_setzero_si256();
  for (int64_t b = 0; b < blocks; ++b, q += kBlock5Cols) {
    for (int i = 0; i < kBlock5Chunks; ++i, w += kChunkBytes) {
      prefetch_ahead(w, last);
      const int planes = i < kBlock5Chunks - 1 ? 5 : 4;  // bytes 48..51 hold 4 codes
      for (int h = 0; h < 2; ++h) {
        __m256i p[5];
        decode5(L, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * h)), p);
        for (int t = 0; t < T; ++t) {
          __m256i pairs = _mm256_setzero_si256();
          for (int n = 0; n < planes; ++n)
            pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(p[n], broadcast4(q + t * g.K + tq1_column(4 * i, n))));
          acc[h][t] = _mm256_add_epi32(acc[h][t], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
  }
  for (int t = 0; t < T; ++t) store_tile(g, tile, t0 + t, acc[0][t], acc[1][t]);
}

constexpr BlockKernel kBlockKernels5[kBlock + 1] = {nullptr, tile5_tokens<1>, tile5_tokens<2>,
                                                    tile5_tokens<3>, tile5_tokens<4>};

void gemm_tiles(const Gemm& g, int64_t tile_begin, int64_t tile_end) {
  gemm_blocks(g, tile_begin, tile_end, g.layout == Layout::tiles5 ? kBlockKernels5 : kBlockKernels, kBlock);
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

void avx2_gemm_tiles5(const Gemm& g, int64_t tile_begin, int64_t tile_end) {
  gemm_blocks(g, tile_begin, tile_end, kBlockKernels5, kBlock);
}

}  // namespace tritlm
