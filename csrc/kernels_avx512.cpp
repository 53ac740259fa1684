// AVX-512 VNNI kernels (Ice Lake / Sapphire Rapids / Zen 4 and later).
//
// A 64-byte chunk of tiles is one register: 16 int32 lanes = 16 weight rows, and each 2-bit
// plane p pairs with activations 16s + 4p .. 16s + 4p + 3, broadcast to every lane. vpdpbusd
// multiplies the unsigned codes by the signed activations and adds groups of 4 into int32.
#include <immintrin.h>

#include <cstring>
#include <vector>

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

// tiles5 decodes with vpermb (AVX512-VBMI: Ice Lake, Zen 4 and later, not Cascade Lake); only
// these functions are compiled for it, and gemm_tiles checks the CPU before calling them.
#define TRITLM_VBMI __attribute__((target("avx512vbmi")))

struct Lookup5 {
  __m512i t[6];
};

TRITLM_VBMI inline Lookup5 load_lookup5() {
  Lookup5 L;
  for (int i = 0; i < 6; ++i) L.t[i] = _mm512_loadu_si512(kTiles5Lookup.t[i]);
  return L;
}

// The five code planes of one chunk: 6 vpermb, a shift and an add for 320 weights. vpermb reads
// the low 6 bits of each index byte, so x >> 2 needs no mask: bits 6-7 are the next byte's.
TRITLM_VBMI inline void decode5(const Lookup5& L, __m512i x, __m512i p[5]) {
  const __m512i hi = _mm512_srli_epi16(x, 2);
  p[0] = _mm512_permutexvar_epi8(x, L.t[0]);
  p[1] = _mm512_permutexvar_epi8(x, L.t[1]);
  p[2] = _mm512_permutexvar_epi8(hi, L.t[2]);
  p[3] = _mm512_permutexvar_epi8(hi, L.t[3]);
  p[4] = _mm512_add_epi8(_mm512_permutexvar_epi8(x, L.t[4]), _mm512_permutexvar_epi8(hi, L.t[5]));
}

// One token (decode), the hot case: the 13 chunks of a block unrolled, every activation offset
// a constant, each code plane into its own accumulator (5 vpdpbusd chains in flight).
TRITLM_VBMI void tile5_one_token(const Gemm& g, int64_t tile, int64_t t0, const uint8_t* last) {
  const int64_t blocks = g.K / kBlock5Cols;
  const uint8_t* w = g.tiles + tile * blocks * kBlock5Bytes;
  const int8_t* q = g.q + t0 * g.K;
  const Lookup5 L = load_lookup5();
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0;
  for (int64_t b = 0; b < blocks; ++b, q += kBlock5Cols) {
#pragma GCC unroll 13
    for (int i = 0; i < kBlock5Chunks; ++i, w += kChunkBytes) {
      prefetch_ahead(w, last);
      __m512i p[5];
      decode5(L, _mm512_loadu_si512(w), p);
      dpbusd_broadcast(a0, p[0], q + tq1_column(4 * i, 0));
      dpbusd_broadcast(a1, p[1], q + tq1_column(4 * i, 1));
      dpbusd_broadcast(a2, p[2], q + tq1_column(4 * i, 2));
      dpbusd_broadcast(a3, p[3], q + tq1_column(4 * i, 3));
      if (i < kBlock5Chunks - 1) dpbusd_broadcast(a4, p[4], q + tq1_column(4 * i, 4));  // bytes 48..51 hold 4
    }
  }
  a0 = _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3));
  store_tile(g, tile, t0, _mm512_add_epi32(a0, a4));
}

inline __m512i dpbusd_bcast(__m512i acc, __m512i codes, const int8_t* q) {
  dpbusd_broadcast(acc, codes, q);
  return acc;
}

// Several tokens: each chunk is decoded once for all T tokens, and plane n goes to accumulator
// n % S of each token, S = enough vpdpbusd chains in flight for small T (the codes are plain
// 0..2, so the accumulators simply add up at the end).
// - kReordered false (up to 4 tokens): plane n of chunk i pairs with columns base + n * step
//   (tq1_column) of each token, one pointer per token.
// - kReordered true: activations rearranged by arrange5, so that token t of the group reads plane
//   j of block b at byte 256 * (b * T + t) + 4 * j: every address one running pointer plus a
//   constant, whatever T (with a pointer per token, GCC runs out of registers beyond 4).
template <int T, int S, bool kReordered>
TRITLM_VBMI void tile5_tokens(const Gemm& g, int64_t tile, int64_t t0, const uint8_t* last) {
  const int64_t blocks = g.K / kBlock5Cols;
  const uint8_t* w = g.tiles + tile * blocks * kBlock5Bytes;
  const int8_t* q = g.q + t0 * g.K;
  const Lookup5 L = load_lookup5();
  __m512i acc[S][T];
  for (int a = 0; a < S; ++a)
    for (int t = 0; t < T; ++t) acc[a][t] = _mm512_setzero_si512();
  // (every acc index is a constant once unrolled, and acc is never passed on by reference:
  // then GCC keeps it in registers)
  for (int64_t b = 0; b < blocks; ++b) {
    for (int i = 0; i < kBlock5Chunks; ++i, w += kChunkBytes) {
      if (t0 == 0) prefetch_ahead(w, last);  // later passes over the tile find it in cache
      __m512i p[5];
      decode5(L, _mm512_loadu_si512(w), p);
      const bool five = i < kBlock5Chunks - 1;  // bytes 48..51 hold 4 codes
      const int64_t step = kReordered ? 4 : tq1_column(4 * i, 1) - tq1_column(4 * i, 0), step3 = 3 * step;
      const int8_t* qt = kReordered ? q : q + tq1_column(4 * i, 0);
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t, qt += kReordered ? kBlock5Cols : g.K) {
        acc[0][t] = dpbusd_bcast(acc[0][t], p[0], qt);
        acc[1 % S][t] = dpbusd_bcast(acc[1 % S][t], p[1], qt + step);
        acc[2 % S][t] = dpbusd_bcast(acc[2 % S][t], p[2], qt + 2 * step);
        acc[3 % S][t] = dpbusd_bcast(acc[3 % S][t], p[3], qt + step3);
        if (five) acc[4 % S][t] = dpbusd_bcast(acc[4 % S][t], p[4], qt + 4 * step);
      }
      if (kReordered) q += five ? 20 : 16;
    }
    q += kReordered ? kBlock5Cols * (T - 1) : kBlock5Cols;
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) {
    __m512i sums = acc[0][t];
#pragma GCC unroll 5
    for (int a = 1; a < S; ++a) sums = _mm512_add_epi32(sums, acc[a][t]);
    store_tile(g, tile, t0 + t, sums);
  }
}

constexpr int kFewTokens5 = 4;
constexpr BlockKernel kBlockKernels5[kFewTokens5 + 1] = {nullptr, tile5_one_token, tile5_tokens<2, 3, false>,
                                                         tile5_tokens<3, 3, false>, tile5_tokens<4, 2, false>};
constexpr BlockKernel kBlockKernels5Reordered[kMaxBlock + 1] = {
    nullptr,
    tile5_tokens<1, 5, true>,  tile5_tokens<2, 3, true>,  tile5_tokens<3, 3, true>,  tile5_tokens<4, 2, true>,
    tile5_tokens<5, 2, true>,  tile5_tokens<6, 2, true>,  tile5_tokens<7, 2, true>,  tile5_tokens<8, 2, true>,
    tile5_tokens<9, 1, true>,  tile5_tokens<10, 1, true>, tile5_tokens<11, 1, true>, tile5_tokens<12, 1, true>,
    tile5_tokens<13, 1, true>, tile5_tokens<14, 1, true>, tile5_tokens<15, 1, true>, tile5_tokens<16, 1, true>};

// For tile5_tokens<T, S, true>: per group of up to 16 tokens (from t0 * K on), per block, per
// token, the block's 64 groups of 4 activations in the order of the code planes (chunk by chunk).
// Each block of a token is one permutation of 64 dwords: 4 loads, 8 vpermt2d, 4 blends, 4 stores.
static_assert(kMaxBlock == kArrangedGroup);
void arrange5(const Gemm& g, int64_t group_begin, int64_t group_end, int8_t* out) {
  struct Permutation {
    __m512i index[4];
    __mmask16 high[4];  // dwords from the block's second half
  };
  static const Permutation perm = [] {
    Permutation p{};
    int32_t source[64];
    for (int i = 0, j = 0; i < kBlock5Chunks; ++i)
      for (int n = 0; n < (i < kBlock5Chunks - 1 ? 5 : 4); ++n) source[j++] = tq1_column(4 * i, n) / 4;
    for (int k = 0; k < 4; ++k) {
      p.index[k] = _mm512_loadu_si512(source + 16 * k);  // vpermt2d reads bits 0-4
      for (int l = 0; l < 16; ++l) p.high[k] |= __mmask16((source[16 * k + l] >= 32) << l);
    }
    return p;
  }();
  for (int64_t t0 = group_begin * kMaxBlock; t0 < g.n_tokens && t0 < group_end * kMaxBlock; t0 += kMaxBlock) {
    const int64_t group = g.n_tokens - t0 < kMaxBlock ? g.n_tokens - t0 : kMaxBlock;
    for (int64_t t = 0; t < group; ++t)
      for (int64_t b = 0; b < g.K / kBlock5Cols; ++b) {
        const int8_t* from = g.q + (t0 + t) * g.K + b * kBlock5Cols;
        int8_t* to = out + t0 * g.K + (b * group + t) * kBlock5Cols;
        __m512i v[4];
        for (int k = 0; k < 4; ++k) v[k] = _mm512_loadu_si512(from + 64 * k);
        for (int k = 0; k < 4; ++k) {
          const __m512i low = _mm512_permutex2var_epi32(v[0], perm.index[k], v[1]);
          const __m512i high = _mm512_permutex2var_epi32(v[2], perm.index[k], v[3]);
          _mm512_storeu_si512(to + 64 * k, _mm512_mask_blend_epi32(perm.high[k], low, high));
        }
      }
  }
}

bool has_vbmi() {
  static const bool vbmi = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi");
  }();
  return vbmi;
}

bool wants_arranged(const Gemm& g) { return g.layout == Layout::tiles5 && has_vbmi() && g.n_tokens > kFewTokens5; }

void gemm_tiles(const Gemm& g, int64_t tile_begin, int64_t tile_end) {
  if (g.layout != Layout::tiles5) return gemm_blocks(g, tile_begin, tile_end, kBlockKernels, kMaxBlock);
  if (!has_vbmi()) return avx2_gemm_tiles5(g, tile_begin, tile_end);
  if (g.n_tokens <= kFewTokens5) return gemm_blocks(g, tile_begin, tile_end, kBlockKernels5, kFewTokens5);
  gemm_blocks(g, tile_begin, tile_end, kBlockKernels5Reordered, kMaxBlock);  // g.q arranged (`multiply`)
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

KernelSet avx512_kernels() {
  return {"avx512", quantize_row, gemm_tiles, read_bytes, has_vbmi() ? Layout::tiles5 : Layout::tiles,
          wants_arranged, arrange5};
}

}  // namespace tritlm
