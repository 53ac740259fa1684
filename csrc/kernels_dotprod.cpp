// aarch64 kernels with SDOT (ARMv8.2 DotProd: Apple M1 and later, Graviton 2 and later, Cortex-A76
// / Raspberry Pi 5). Compiled with -march=armv8.2-a+dotprod.
//
// SDOT by element is the tiles layout's instruction on 128 bits, as vpdpbusd is on 512: lane r of
// a register (row 4g + r) takes the 4 codes of plane p times activations 16s + 4p .. + 3, which
// are 32-bit lane p of the chunk's 16 activations: one load of 16 bytes serves the 16 planes of a
// chunk, no broadcast and no horizontal sum. The codes (0..2) are signed bytes as well as
// unsigned, so signed SDOT needs no offset.
#include "kernels_arm.h"

namespace tritlm {
namespace {

// One token (decode): bandwidth-bound, so the fewest instructions per byte. Planes 0-2 are masked
// in place (code << 2p, at most 32: still a positive int8) and plane 3 shifted down, one
// instruction each, into accumulators of their own; acc[1] and acc[2] are exact multiples of 4
// and 16, shifted back once at the end. 16 independent SDOT chains.
void tile_one_token(const Gemm& g, int64_t tile, int64_t t0, const uint8_t* last) {
  const int64_t chunks = g.K / kChunkCols;
  const uint8_t* w = g.tiles + tile * chunks * kChunkBytes;
  const int8_t* q = g.q + t0 * g.K;
  const uint8x16_t m0 = vdupq_n_u8(0x03), m1 = vdupq_n_u8(0x0c), m2 = vdupq_n_u8(0x30);
  int32x4_t acc[4][4];
  for (int i = 0; i < 4; ++i)
    for (int p = 0; p < 4; ++p) acc[i][p] = vdupq_n_s32(0);
  for (int64_t s = 0; s < chunks; ++s, w += kChunkBytes, q += kChunkCols) {
    prefetch_ahead(w, last);
    const int8x16_t qs = vld1q_s8(q);
    uint8x16_t x[4];
    load_chunk(w, x);
    for (int i = 0; i < 4; ++i) {
      acc[i][0] = vdotq_laneq_s32(acc[i][0], vreinterpretq_s8_u8(vandq_u8(x[i], m0)), qs, 0);
      acc[i][1] = vdotq_laneq_s32(acc[i][1], vreinterpretq_s8_u8(vandq_u8(x[i], m1)), qs, 1);
      acc[i][2] = vdotq_laneq_s32(acc[i][2], vreinterpretq_s8_u8(vandq_u8(x[i], m2)), qs, 2);
      acc[i][3] = vdotq_laneq_s32(acc[i][3], vreinterpretq_s8_u8(vshrq_n_u8(x[i], 6)), qs, 3);
    }
  }
  int32x4_t sums[4];
  for (int i = 0; i < 4; ++i)
    sums[i] = vaddq_s32(vaddq_s32(acc[i][0], vshrq_n_s32(acc[i][1], 2)), vaddq_s32(vshrq_n_s32(acc[i][2], 4), acc[i][3]));
  store_tile_neon(g, tile, t0, sums);
}

// 2-4 tokens (prefill, batched decode): each register's planes decoded once for T tokens, one
// accumulator per register and token (4 SDOT a chunk). 4T accumulators, T activation registers,
// 4 planes: up to 4 tokens fit the 32 registers.
template <int T>
void tile_tokens(const Gemm& g, int64_t tile, int64_t t0, const uint8_t* last) {
  const int64_t chunks = g.K / kChunkCols;
  const uint8_t* w = g.tiles + tile * chunks * kChunkBytes;
  const int8_t* q = g.q + t0 * g.K;
  int32x4_t acc[4][T];
  for (int i = 0; i < 4; ++i)
    for (int t = 0; t < T; ++t) acc[i][t] = vdupq_n_s32(0);
  for (int64_t s = 0; s < chunks; ++s, w += kChunkBytes, q += kChunkCols) {
    if (t0 == 0) prefetch_ahead(w, last);  // the tile's first pass streams from DRAM, later ones from L1
    int8x16_t qs[T];
    for (int t = 0; t < T; ++t) qs[t] = vld1q_s8(q + t * g.K);
    for (int i = 0; i < 4; ++i) {
      int8x16_t p[4];
      planes(vld1q_u8(w + 16 * i), p);
      for (int t = 0; t < T; ++t) {
        acc[i][t] = vdotq_laneq_s32(acc[i][t], p[0], qs[t], 0);
        acc[i][t] = vdotq_laneq_s32(acc[i][t], p[1], qs[t], 1);
        acc[i][t] = vdotq_laneq_s32(acc[i][t], p[2], qs[t], 2);
        acc[i][t] = vdotq_laneq_s32(acc[i][t], p[3], qs[t], 3);
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    const int32x4_t sums[4] = {acc[0][t], acc[1][t], acc[2][t], acc[3][t]};
    store_tile_neon(g, tile, t0 + t, sums);
  }
}

constexpr int kMaxBlock = 4;
constexpr BlockKernel kBlockKernels[kMaxBlock + 1] = {nullptr, tile_one_token, tile_tokens<2>, tile_tokens<3>,
                                                      tile_tokens<4>};

}  // namespace

void dotprod_gemm_tiles(const Gemm& g, int64_t tile_begin, int64_t tile_end) {
  // tiles5 needs six 64-entry lookups per register (TBL of 4 table registers each: 24 of the 32
  // registers just for tables), so it takes the portable kernel; best_layout keeps it off ARM.
  if (g.layout == Layout::tiles5) return portable_kernels().gemm_tiles(g, tile_begin, tile_end);
  gemm_blocks(g, tile_begin, tile_end, kBlockKernels, kMaxBlock);
}

KernelSet dotprod_kernels() { return {"dotprod", neon_quantize_row, dotprod_gemm_tiles, neon_read_bytes}; }

}  // namespace tritlm
