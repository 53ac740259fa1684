// Portable C++ kernels: the fallback on any CPU, and the plainest statement of each kernel.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace tritlm {
namespace {

bool quantize_row(const float* x, int64_t k, int8_t* q, float* scale, int32_t* sum) {
  float amax = 0.0f;
  for (int64_t i = 0; i < k; ++i) {
    if (!std::isfinite(x[i])) return false;
    amax = std::fmax(amax, std::fabs(x[i]));
  }
  const float s = act_scale_from_max(amax);
  int32_t total = 0;
  for (int64_t i = 0; i < k; ++i) {
    q[i] = int8_t(quantize_value(x[i], s));
    total += q[i];
  }
  *scale = s;
  *sum = total;
  return true;
}

// The sums of one tile's rows for token t, raw or rescaled.
void store_tile(const Gemm& g, int64_t tile, int64_t t, const int32_t* acc) {
  const int64_t m0 = tile * kTileRows, rows = std::min<int64_t>(kTileRows, g.M - m0);
  for (int64_t r = 0; r < rows; ++r) {
    if (g.sums) g.sums[t * g.M + m0 + r] = acc[r];
    else g.out[t * g.M + m0 + r] = rescale(acc[r], g.act_sum[t], g.act_scale[t], g.row_scale[m0 + r]);
  }
}

// tiles5: every byte decoded by its lookups, its 4 or 5 codes each paired with its column.
void gemm_tiles5(const Gemm& g, int64_t tile_begin, int64_t tile_end) {
  const auto& L = kTiles5Lookup.t;
  const int64_t blocks = g.K / kBlock5Cols;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const uint8_t* w = g.tiles + tile * blocks * kBlock5Bytes;
    for (int64_t t = 0; t < g.n_tokens; ++t) {
      int32_t acc[kTileRows] = {};
      for (int64_t b = 0; b < blocks; ++b) {
        const int8_t* q = g.q + t * g.K + b * kBlock5Cols;
        for (int i = 0; i < kBlock5Chunks; ++i) {
          const uint8_t* chunk = w + b * kBlock5Bytes + i * kChunkBytes;
          for (int r = 0; r < kTileRows; ++r)
            for (int j = 0; j < 4; ++j) {
              const int m = 4 * i + j, x = chunk[4 * r + j], lo = x & 63, hi = x >> 2;
              const int codes[5] = {L[0][lo], L[1][lo], L[2][hi], L[3][hi], L[4][lo] + L[5][hi]};
              for (int n = 0; n < (m < 48 ? 5 : 4); ++n) acc[r] += codes[n] * q[tq1_column(m, n)];
            }
        }
      }
      store_tile(g, tile, t, acc);
    }
  }
}

void gemm_tiles(const Gemm& g, int64_t tile_begin, int64_t tile_end) {
  if (g.layout == Layout::tiles5) return gemm_tiles5(g, tile_begin, tile_end);
  const int64_t chunks = g.K / kChunkCols;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const uint8_t* w = g.tiles + tile * chunks * kChunkBytes;
    for (int64_t t = 0; t < g.n_tokens; ++t) {
      const int8_t* q = g.q + t * g.K;
      int32_t acc[kTileRows] = {};
      for (int64_t s = 0; s < chunks; ++s) {
        const uint8_t* chunk = w + s * kChunkBytes;
        for (int r = 0; r < kTileRows; ++r)
          for (int j = 0; j < 4; ++j)
            for (int p = 0; p < 4; ++p)
              acc[r] += ((chunk[4 * r + j] >> (2 * p)) & 3) * q[16 * s + 4 * p + j];
      }
      store_tile(g, tile, t, acc);
    }
  }
}

uint64_t read_bytes(const uint8_t* p, int64_t n) {
  uint64_t acc = 0;
  for (int64_t i = 0; i < n; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    acc ^= v;
  }
  return acc;
}

}  // namespace

KernelSet portable_kernels() { return {"portable", quantize_row, gemm_tiles, read_bytes}; }

}  // namespace tritlm
