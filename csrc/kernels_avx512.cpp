// AVX-512 VNNI kernels (Ice Lake / Sapphire Rapids / Zen 4 and later).
//
// A 64-byte chunk of tiles is one register: 16 int32 lanes = 16 weight rows, and each 2-bit
// plane p pairs with activations 16s + 4p .. 16s + 4p + 3, broadcast to every lane. vpdpbusd
// multiplies the unsigned codes by the signed activations and adds groups of 4 into int32.
#include <immintrin.h>

#include <cstring>

#include "kernels.h"

namespace tritlm {
namespace {

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

inline __mmask16 row_mask(const Gemm& g, int64_t tile) {
  const int64_t rows = g.M - tile * kTileRows;
  return rows >= kTileRows ? __mmask16(0xFFFF) : __mmask16((1u << rows) - 1);
}

inline void store_tile(const Gemm& g, int64_t tile, int64_t t, __m512i sums) {
  const int64_t m0 = tile * kTileRows;
  const __mmask16 mask = row_mask(g, tile);
  if (g.sums) {
    _mm512_mask_storeu_epi32(g.sums + t * g.M + m0, mask, sums);
    return;
  }
  const __m512 diff = _mm512_sub_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(float(g.act_sum[t])));
  const __m512 y = _mm512_mul_ps(_mm512_div_ps(diff, _mm512_set1_ps(g.act_scale[t])),
                                 _mm512_maskz_loadu_ps(mask, g.row_scale + m0));
  _mm512_mask_storeu_ps(g.out + t * g.M + m0, mask, y);
}

// Few tokens (decode): bandwidth-bound, so spend the fewest instructions per byte. Each plane is
// masked in place (code << 2p) into its own accumulator, which removes the shifts from the loop
// and gives 4 independent dependency chains; acc_p is an exact multiple of 4^p, so shifting it
// back at the end is exact.
template <int T>
void tile_few_tokens(const Gemm& g, int64_t tile, int64_t t0, const uint8_t* last) {
  const int64_t chunks = g.K / kChunkCols;
  const uint8_t* w = g.tiles + tile * chunks * kChunkBytes;
  const int8_t* q = g.q + t0 * g.K;
  const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0C);
  const __m512i m2 = _mm512_set1_epi8(0x30), m3 = _mm512_set1_epi8(char(0xC0));
  __m512i acc[4][T];
  for (int t = 0; t < T; ++t)
    for (int p = 0; p < 4; ++p) acc[p][t] = _mm512_setzero_si512();
  for (int64_t s = 0; s < chunks; ++s) {
    prefetch_ahead(w + s * kChunkBytes, last);
    const __m512i x = _mm512_loadu_si512(w + s * kChunkBytes);
    const __m512i w0 = _mm512_and_si512(x, m0), w1 = _mm512_and_si512(x, m1);
    const __m512i w2 = _mm512_and_si512(x, m2), w3 = _mm512_and_si512(x, m3);
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      const int8_t* qs = q + t * g.K + s * kChunkCols;
      acc[0][t] = _mm512_dpbusd_epi32(acc[0][t], w0, broadcast4(qs));
      acc[1][t] = _mm512_dpbusd_epi32(acc[1][t], w1, broadcast4(qs + 4));
      acc[2][t] = _mm512_dpbusd_epi32(acc[2][t], w2, broadcast4(qs + 8));
      acc[3][t] = _mm512_dpbusd_epi32(acc[3][t], w3, broadcast4(qs + 12));
    }
  }
  for (int t = 0; t < T; ++t) {
    const __m512i sums = _mm512_add_epi32(
        _mm512_add_epi32(acc[0][t], _mm512_srai_epi32(acc[1][t], 2)),
        _mm512_add_epi32(_mm512_srai_epi32(acc[2][t], 4), _mm512_srai_epi32(acc[3][t], 6)));
    store_tile(g, tile, t0 + t, sums);
  }
}

// Many tokens (prefill): compute-bound. Unpack each chunk once into 4 planes of plain codes and
// reuse them for T tokens. Each accumulator takes 4 dependent vpdpbusd per chunk; up to 8 tokens
// that chain, not throughput, would set the pace, so small blocks give planes 2 and 3 a second
// set of accumulators (added together at the end: int32 sums, exact in any order).
template <int T>
void tile_many_tokens(const Gemm& g, int64_t tile, int64_t t0, const uint8_t* last) {
  constexpr int kSets = T <= 8 ? 2 : 1;
  const int64_t chunks = g.K / kChunkCols;
  const uint8_t* w = g.tiles + tile * chunks * kChunkBytes;
  const int8_t* q = g.q + t0 * g.K;
  const __m512i m = _mm512_set1_epi8(0x03);
  __m512i acc[kSets][T];
  for (int a = 0; a < kSets; ++a)
    for (int t = 0; t < T; ++t) acc[a][t] = _mm512_setzero_si512();
  for (int64_t s = 0; s < chunks; ++s) {
    if (t0 == 0) prefetch_ahead(w + s * kChunkBytes, last);  // the tile's first pass streams from DRAM
    const __m512i x = _mm512_loadu_si512(w + s * kChunkBytes);
    const __m512i p0 = _mm512_and_si512(x, m);
    const __m512i p1 = _mm512_and_si512(_mm512_srli_epi16(x, 2), m);
    const __m512i p2 = _mm512_and_si512(_mm512_srli_epi16(x, 4), m);
    const __m512i p3 = _mm512_and_si512(_mm512_srli_epi16(x, 6), m);
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      const int8_t* qs = q + t * g.K + s * kChunkCols;
      acc[0][t] = _mm512_dpbusd_epi32(acc[0][t], p0, broadcast4(qs));
      acc[0][t] = _mm512_dpbusd_epi32(acc[0][t], p1, broadcast4(qs + 4));
      acc[kSets - 1][t] = _mm512_dpbusd_epi32(acc[kSets - 1][t], p2, broadcast4(qs + 8));
      acc[kSets - 1][t] = _mm512_dpbusd_epi32(acc[kSets - 1][t], p3, broadcast4(qs + 12));
    }
  }
  for (int t = 0; t < T; ++t)
    store_tile(g, tile, t0 + t, kSets == 2 ? _mm512_add_epi32(acc[0][t], acc[kSets - 1][t]) : acc[0][t]);
}

// acc += codes (u8) x the 4 int8 at q broadcast to every lane. GCC does not fold the broadcast
// load into vpdpbusd by itself; folded, the loop issues a quarter fewer instructions.
inline void dpbusd_broadcast(__m512i& acc, __m512i codes, const int8_t* q) {
  __asm__("vpdpbusd %[q]%{1to16%}, %[codes], %[acc]"
          : [acc] "+v"(acc)
          : [codes] "v"(codes), [q] "m"(*reinterpret_cast<const int32_t*>(q)));
}

// One token (decode), the hot case: tile_few_tokens<1> written out by hand, two chunks per
// iteration (K is a multiple of 128, so the chunk count is even) into 8 independent chains.
void tile_one_token(const Gemm& g, int64_t tile, int64_t t0, const uint8_t* last) {
  const int64_t chunks = g.K / kChunkCols;
  const uint8_t* w = g.tiles + tile * chunks * kChunkBytes;
  const int8_t* q = g.q + t0 * g.K;
  const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0C);
  const __m512i m2 = _mm512_set1_epi8(0x30), m3 = _mm512_set1_epi8(char(0xC0));
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  for (int64_t s = 0; s < chunks; s += 2, w += 2 * kChunkBytes, q += 2 * kChunkCols) {
    prefetch_ahead(w, last);
    prefetch_ahead(w + kChunkBytes, last);
    const __m512i x = _mm512_loadu_si512(w), y = _mm512_loadu_si512(w + kChunkBytes);
    dpbusd_broadcast(a0, _mm512_and_si512(x, m0), q);
    dpbusd_broadcast(a1, _mm512_and_si512(x, m1), q + 4);
    dpbusd_broadcast(a2, _mm512_and_si512(x, m2), q + 8);
    dpbusd_broadcast(a3, _mm512_and_si512(x, m3), q + 12);
    dpbusd_broadcast(b0, _mm512_and_si512(y, m0), q + 16);
    dpbusd_broadcast(b1, _mm512_and_si512(y, m1), q + 20);
    dpbusd_broadcast(b2, _mm512_and_si512(y, m2), q + 24);
    dpbusd_broadcast(b3, _mm512_and_si512(y, m3), q + 28);
  }
  a0 = _mm512_add_epi32(a0, b0);
  a1 = _mm512_add_epi32(a1, b1);
  a2 = _mm512_add_epi32(a2, b2);
  a3 = _mm512_add_epi32(a3, b3);
  const __m512i sums = _mm512_add_epi32(_mm512_add_epi32(a0, _mm512_srai_epi32(a1, 2)),
                                        _mm512_add_epi32(_mm512_srai_epi32(a2, 4), _mm512_srai_epi32(a3, 6)));
  store_tile(g, tile, t0, sums);
}

constexpr int kMaxBlock = 16;
constexpr BlockKernel kBlockKernels[kMaxBlock + 1] = {
    nullptr,                 tile_one_token,       tile_few_tokens<2>,   tile_few_tokens<3>,
    tile_few_tokens<4>,      tile_many_tokens<5>,  tile_many_tokens<6>,  tile_many_tokens<7>,
    tile_many_tokens<8>,     tile_many_tokens<9>,  tile_many_tokens<10>, tile_many_tokens<11>,
    tile_many_tokens<12>,    tile_many_tokens<13>, tile_many_tokens<14>, tile_many_tokens<15>,
    tile_many_tokens<16>};

void gemm_tiles(const Gemm& g, int64_t tile_begin, int64_t tile_end) {
  gemm_blocks(g, tile_begin, tile_end, kBlockKernels, kMaxBlock);
}

bool quantize_row(const float* x, int64_t k, int8_t* q, float* scale, int32_t* sum) {
  // max|x| on the bit patterns: for non-negative floats integer order is float order, and every
  // NaN or infinity compares at or above 0x7f800000.
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  __m512i amax = _mm512_setzero_si512();
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 mask = k - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - i)) - 1);
    amax = _mm512_max_epi32(amax, _mm512_and_si512(_mm512_maskz_loadu_epi32(mask, x + i), abs_mask));
  }
  const int32_t amax_bits = _mm512_reduce_max_epi32(amax);
  if (amax_bits >= 0x7f800000) return false;
  float amax_f;
  std::memcpy(&amax_f, &amax_bits, 4);
  const float s = act_scale_from_max(amax_f);
  const __m512 vs = _mm512_set1_ps(s);
  const __m512i lo = _mm512_set1_epi32(-128), hi = _mm512_set1_epi32(127);
  __m512i total = _mm512_setzero_si512();
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 mask = k - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - i)) - 1);
    // cvtps rounds half to even in the default rounding mode, like the reference's rint
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + i), vs));
    v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
    total = _mm512_add_epi32(total, v);
    _mm512_mask_cvtepi32_storeu_epi8(q + i, mask, v);
  }
  *scale = s;
  *sum = _mm512_reduce_add_epi32(total);
  return true;
}

uint64_t read_bytes(const uint8_t* p, int64_t n) {
  __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
  int64_t i = 0;
  for (; i + 256 <= n; i += 256) {
    a = _mm512_xor_si512(a, _mm512_loadu_si512(p + i));
    b = _mm512_xor_si512(b, _mm512_loadu_si512(p + i + 64));
    c = _mm512_xor_si512(c, _mm512_loadu_si512(p + i + 128));
    d = _mm512_xor_si512(d, _mm512_loadu_si512(p + i + 192));
  }
  for (; i < n; i += 64) a = _mm512_xor_si512(a, _mm512_loadu_si512(p + i));
  const __m512i all = _mm512_xor_si512(_mm512_xor_si512(a, b), _mm512_xor_si512(c, d));
  return uint64_t(_mm512_reduce_add_epi64(all));
}

}  // namespace

KernelSet avx512_kernels() { return {"avx512", quantize_row, gemm_tiles, read_bytes}; }

}  // namespace tritlm
