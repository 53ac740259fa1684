// aarch64 kernels with SMMLA (ARMv8.6 I8MM: Apple M2 and later, Graviton 3 and later, Neoverse
// N2 / V1). Compiled with -march=armv8.2-a+dotprod+i8mm.
//
// SMMLA multiplies a 2 x 8 int8 matrix by the transpose of another into a 2 x 2 int32 block:
// acc[2i + j] += sum over k < 8 of a[8i + k] * b[8j + k]. Here a = two weight rows x 8 columns,
// b = two tokens x the same 8 columns: 32 multiply-adds per instruction, twice SDOT's 16.
// In the tiles layout a register's plane p holds 4 rows x columns 4p .. 4p + 3 of its chunk, so
// zipping planes 0 and 1 at 32 bits gives rows (0, 1) and rows (2, 3) x columns 0..7, and planes 2
// and 3 columns 8..15; zipping two tokens' 16 activations at 64 bits gives columns 0..7 and 8..15
// of both. One token (decode) is the dotprod kernel: SMMLA would waste half its products.
#include "kernels_arm.h"

namespace tritlm {
namespace {

// T = 2..4 tokens as P = ceil(T / 2) pairs (a missing fourth token multiplies zeros). acc[i][h][P]:
// register i's rows (4i + 2h, 4i + 2h + 1) x the pair's two tokens. 16 accumulators at T = 4.
template <int T>
void tile_tokens(const Gemm& g, int64_t tile, int64_t t0, const uint8_t* last) {
  constexpr int P = (T + 1) / 2;
  const int64_t chunks = g.K / kChunkCols;
  const uint8_t* w = g.tiles + tile * chunks * kChunkBytes;
  const int8_t* q = g.q + t0 * g.K;
  int32x4_t acc[4][2][P];
  for (int i = 0; i < 4; ++i)
    for (int h = 0; h < 2; ++h)
      for (int c = 0; c < P; ++c) acc[i][h][c] = vdupq_n_s32(0);
  for (int64_t s = 0; s < chunks; ++s, w += kChunkBytes, q += kChunkCols) {
    if (t0 == 0) prefetch_ahead(w, last);  // the tile's first pass streams from DRAM, later ones from L1
    int8x16_t lo[P], hi[P];  // pair c: tokens 2c, 2c + 1 x columns 0..7, and x columns 8..15
    for (int c = 0; c < P; ++c) {
      const int64x2_t a = vreinterpretq_s64_s8(vld1q_s8(q + 2 * c * g.K));
      const int64x2_t b = 2 * c + 1 < T ? vreinterpretq_s64_s8(vld1q_s8(q + (2 * c + 1) * g.K)) : vdupq_n_s64(0);
      lo[c] = vreinterpretq_s8_s64(vzip1q_s64(a, b));
      hi[c] = vreinterpretq_s8_s64(vzip2q_s64(a, b));
    }
    for (int i = 0; i < 4; ++i) {
      int8x16_t p[4];
      planes(vld1q_u8(w + 16 * i), p);
      const int32x4_t p0 = vreinterpretq_s32_s8(p[0]), p1 = vreinterpretq_s32_s8(p[1]);
      const int32x4_t p2 = vreinterpretq_s32_s8(p[2]), p3 = vreinterpretq_s32_s8(p[3]);
      const int8x16_t rows01_lo = vreinterpretq_s8_s32(vzip1q_s32(p0, p1)), rows23_lo = vreinterpretq_s8_s32(vzip2q_s32(p0, p1));
      const int8x16_t rows01_hi = vreinterpretq_s8_s32(vzip1q_s32(p2, p3)), rows23_hi = vreinterpretq_s8_s32(vzip2q_s32(p2, p3));
      for (int c = 0; c < P; ++c) {
        acc[i][0][c] = vmmlaq_s32(acc[i][0][c], rows01_lo, lo[c]);
        acc[i][1][c] = vmmlaq_s32(acc[i][1][c], rows23_lo, lo[c]);
        acc[i][0][c] = vmmlaq_s32(acc[i][0][c], rows01_hi, hi[c]);
        acc[i][1][c] = vmmlaq_s32(acc[i][1][c], rows23_hi, hi[c]);
      }
    }
  }
  // acc[i][0][c] = (row 4i, token 2c), (4i, 2c + 1), (4i + 1, 2c), (4i + 1, 2c + 1): the even
  // lanes of rows 01 and 23 are token 2c's rows 4i .. 4i + 3, the odd lanes token 2c + 1's
  for (int c = 0; c < P; ++c) {
    int32x4_t even[4], odd[4];
    for (int i = 0; i < 4; ++i) {
      even[i] = vuzp1q_s32(acc[i][0][c], acc[i][1][c]);
      odd[i] = vuzp2q_s32(acc[i][0][c], acc[i][1][c]);
    }
    store_tile_neon(g, tile, t0 + 2 * c, even);
    if (2 * c + 1 < T) store_tile_neon(g, tile, t0 + 2 * c + 1, odd);
  }
}

// 4 tokens per pass over a tile: 16 accumulators, 4 activation and 4 weight operands, the
// planes and the loads fit the 32 registers; the tile is read again from L1 for the next 4.
constexpr int kMaxBlock = 4;

void tile_one_token(const Gemm& g, int64_t tile, int64_t t0, const uint8_t*) {
  Gemm one = g;  // the dotprod kernel, on this token alone
  one.q = g.q + t0 * g.K;
  one.n_tokens = 1;
  one.act_scale = g.act_scale + t0;
  one.act_sum = g.act_sum + t0;
  if (g.out) one.out = g.out + t0 * g.M;
  if (g.sums) one.sums = g.sums + t0 * g.M;
  dotprod_gemm_tiles(one, tile, tile + 1);
}

constexpr BlockKernel kBlockKernels[kMaxBlock + 1] = {nullptr, tile_one_token, tile_tokens<2>, tile_tokens<3>,
                                                      tile_tokens<4>};

void gemm_tiles(const Gemm& g, int64_t tile_begin, int64_t tile_end) {
  if (g.layout == Layout::tiles5 || g.n_tokens == 1) return dotprod_gemm_tiles(g, tile_begin, tile_end);
  gemm_blocks(g, tile_begin, tile_end, kBlockKernels, kMaxBlock);
}

}  // namespace

KernelSet i8mm_kernels() { return {"i8mm", neon_quantize_row, gemm_tiles, neon_read_bytes}; }

}  // namespace tritlm
