// Baseline aarch64 kernels (ASIMD only: Cortex-A53/A72, Raspberry Pi 3 and 4). Without SDOT the
// byte products are widening multiplies: SMLAL / SMLAL2 multiply 8 codes by 8 activations into
// int16 lanes, each plane's activation group broadcast to the 4 rows of a register by one DUP.
// int16 sums stay exact over kWiden chunks, then SADALP widens them into int32.
#include <cstring>

#include "kernels_arm.h"

namespace tritlm {
namespace {

// An int16 lane takes 4 products per chunk (one per plane), each in [2 x -128, 2 x 127]: over 16
// chunks [64 x -256, 64 x 254] = [-16384, 16256], exact.
constexpr int64_t kWiden = 16;

// One token, one tile. Accumulators: register g's rows (4g, 4g + 1) in lo[g] and (4g + 2, 4g + 3)
// in hi[g], each lane one row's product with one column j of the 4 in a group.
void tile_one_token(const Gemm& g, int64_t tile, int64_t t0, const uint8_t* last) {
  const int64_t chunks = g.K / kChunkCols;
  const uint8_t* w = g.tiles + tile * chunks * kChunkBytes;
  const int8_t* q = g.q + t0 * g.K;
  int32x4_t lo32[4], hi32[4];
  for (int i = 0; i < 4; ++i) lo32[i] = hi32[i] = vdupq_n_s32(0);
  for (int64_t s0 = 0; s0 < chunks; s0 += kWiden) {
    const int64_t s1 = s0 + kWiden < chunks ? s0 + kWiden : chunks;
    int16x8_t lo[4], hi[4];
    for (int i = 0; i < 4; ++i) lo[i] = hi[i] = vdupq_n_s16(0);
    for (int64_t s = s0; s < s1; ++s) {
      prefetch_ahead(w + s * kChunkBytes, last);
      const int32x4_t qs = vreinterpretq_s32_s8(vld1q_s8(q + s * kChunkCols));
      const int8x16_t a[4] = {vreinterpretq_s8_s32(vdupq_laneq_s32(qs, 0)), vreinterpretq_s8_s32(vdupq_laneq_s32(qs, 1)),
                              vreinterpretq_s8_s32(vdupq_laneq_s32(qs, 2)), vreinterpretq_s8_s32(vdupq_laneq_s32(qs, 3))};
      uint8x16_t x[4];
      load_chunk(w + s * kChunkBytes, x);
      for (int i = 0; i < 4; ++i) {
        int8x16_t p[4];
        planes(x[i], p);
        for (int n = 0; n < 4; ++n) {
          lo[i] = vmlal_s8(lo[i], vget_low_s8(p[n]), vget_low_s8(a[n]));
          hi[i] = vmlal_high_s8(hi[i], p[n], a[n]);
        }
      }
    }
    for (int i = 0; i < 4; ++i) lo32[i] = vpadalq_s16(lo32[i], lo[i]), hi32[i] = vpadalq_s16(hi32[i], hi[i]);
  }
  // lo32[g] = rows 4g, 4g + 1 as two column pairs each: one more pairwise add gives the rows
  const int32x4_t sums[4] = {vpaddq_s32(lo32[0], hi32[0]), vpaddq_s32(lo32[1], hi32[1]),
                             vpaddq_s32(lo32[2], hi32[2]), vpaddq_s32(lo32[3], hi32[3])};
  store_tile_neon(g, tile, t0, sums);
}

constexpr BlockKernel kOneToken[2] = {nullptr, tile_one_token};

// Several tokens take a tile one token at a time, while it sits in L1 (a tile of K = 2560 is 10
// KB): planes decoded again per token, which SDOT-less cores can afford less than the extra
// registers sharing them would cost.
void gemm_tiles(const Gemm& g, int64_t tile_begin, int64_t tile_end) {
  if (g.layout == Layout::tiles5) return portable_kernels().gemm_tiles(g, tile_begin, tile_end);
  gemm_blocks(g, tile_begin, tile_end, kOneToken, 1);
}

}  // namespace

bool neon_quantize_row(const float* x, int64_t k, int8_t* q, float* scale, int32_t* sum) {
  // max|x| on the bit patterns: for non-negative floats integer order is float order, and every
  // NaN or infinity compares at or above 0x7f800000
  const uint32x4_t abs_mask = vdupq_n_u32(0x7fffffff);
  uint32x4_t amax = vdupq_n_u32(0);
  int64_t i = 0;
  for (; i + 4 <= k; i += 4)
    amax = vmaxq_u32(amax, vandq_u32(vreinterpretq_u32_f32(vld1q_f32(x + i)), abs_mask));
  uint32_t amax_bits = vmaxvq_u32(amax);
  for (; i < k; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, 4);
    bits &= 0x7fffffff;
    amax_bits = bits > amax_bits ? bits : amax_bits;
  }
  if (amax_bits >= 0x7f800000) return false;
  float amax_f;
  std::memcpy(&amax_f, &amax_bits, 4);
  const float s = act_scale_from_max(amax_f);
  const float32x4_t vs = vdupq_n_f32(s);
  int32x4_t total = vdupq_n_s32(0);
  for (i = 0; i + 16 <= k; i += 16) {
    int32x4_t v[4];  // FCVTNS rounds to nearest even, like nearbyint in the default mode
    for (int j = 0; j < 4; ++j) v[j] = vcvtnq_s32_f32(vmulq_f32(vld1q_f32(x + i + 4 * j), vs));
    // saturating narrows: the clamp to [-128, 127]
    const int16x8_t h0 = vcombine_s16(vqmovn_s32(v[0]), vqmovn_s32(v[1]));
    const int16x8_t h1 = vcombine_s16(vqmovn_s32(v[2]), vqmovn_s32(v[3]));
    const int8x16_t b = vcombine_s8(vqmovn_s16(h0), vqmovn_s16(h1));
    vst1q_s8(q + i, b);
    total = vpadalq_s16(total, vpaddlq_s8(b));
  }
  int32_t tail = 0;
  for (; i < k; ++i) {
    q[i] = int8_t(quantize_value(x[i], s));
    tail += q[i];
  }
  *scale = s;
  *sum = vaddvq_s32(total) + tail;
  return true;
}

uint64_t neon_read_bytes(const uint8_t* p, int64_t n) {
  uint8x16_t a = vdupq_n_u8(0), b = a, c = a, d = a;
  for (int64_t i = 0; i < n; i += 64) {
    a = veorq_u8(a, vld1q_u8(p + i));
    b = veorq_u8(b, vld1q_u8(p + i + 16));
    c = veorq_u8(c, vld1q_u8(p + i + 32));
    d = veorq_u8(d, vld1q_u8(p + i + 48));
  }
  return vgetq_lane_u64(vreinterpretq_u64_u8(veorq_u8(veorq_u8(a, b), veorq_u8(c, d))), 0);
}

KernelSet neon_kernels() { return {"neon", neon_quantize_row, gemm_tiles, neon_read_bytes}; }

}  // namespace tritlm
