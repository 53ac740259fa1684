// Helpers of the aarch64 kernel files (kernels_neon.cpp, kernels_dotprod.cpp, kernels_i8mm.cpp).
// Static, like kernels.h's: each file, compiled with its own -march, keeps its own copy.
//
// A 64-byte chunk of the tiles layout is four 128-bit registers, register g holding rows
// 4g .. 4g + 3 (byte 4r + j: row 4g + r, at bit 2p the code of column 16s + 4p + j). Plane p of a
// register is a 4 x 4 matrix of codes: 4 rows by the 4 columns 16s + 4p .. 16s + 4p + 3.
#pragma once
#include <arm_neon.h>

#include "kernels.h"

namespace tritlm {

// A tile's 16 sums of token t, rows 4g .. 4g + 3 in sums[g]: raw, or through the epilogue in
// rescale's order (float(S) - float(A), / act_scale, * row_scale), four rows at a time.
static inline void store_tile_neon(const Gemm& g, int64_t tile, int64_t t, const int32x4_t (&sums)[4]) {
  const int64_t m0 = tile * kTileRows;
  const int64_t rows = g.M - m0 < kTileRows ? g.M - m0 : kTileRows;
  if (rows < kTileRows) {  // the last tile, short of rows
    int32_t s[kTileRows];
    for (int i = 0; i < 4; ++i) vst1q_s32(s + 4 * i, sums[i]);
    for (int64_t r = 0; r < rows; ++r) {
      if (g.sums) g.sums[t * g.M + m0 + r] = s[r];
      else g.out[t * g.M + m0 + r] = rescale(s[r], g.act_sum[t], g.act_scale[t], g.row_scale[m0 + r]);
    }
    return;
  }
  if (g.sums) {
    for (int i = 0; i < 4; ++i) vst1q_s32(g.sums + t * g.M + m0 + 4 * i, sums[i]);
    return;
  }
  const float32x4_t act_sum = vdupq_n_f32(float(g.act_sum[t])), act_scale = vdupq_n_f32(g.act_scale[t]);
  for (int i = 0; i < 4; ++i) {
    const float32x4_t diff = vsubq_f32(vcvtq_f32_s32(sums[i]), act_sum);
    vst1q_f32(g.out + t * g.M + m0 + 4 * i, vmulq_f32(vdivq_f32(diff, act_scale), vld1q_f32(g.row_scale + m0 + 4 * i)));
  }
}

// The four registers of chunk s of a tile.
static inline void load_chunk(const uint8_t* w, uint8x16_t (&x)[4]) {
  for (int i = 0; i < 4; ++i) x[i] = vld1q_u8(w + 16 * i);
}

// The four planes of a register as plain codes 0..2 (3 ANDs, 3 shifts).
static inline void planes(uint8x16_t x, int8x16_t (&p)[4]) {
  const uint8x16_t m = vdupq_n_u8(3);
  p[0] = vreinterpretq_s8_u8(vandq_u8(x, m));
  p[1] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(x, 2), m));
  p[2] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(x, 4), m));
  p[3] = vreinterpretq_s8_u8(vshrq_n_u8(x, 6));
}

}  // namespace tritlm
