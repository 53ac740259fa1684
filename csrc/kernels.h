// Kernel interface shared by every instruction set. Each kernels_<isa>.cpp is compiled with its
// own target flags and exposes one KernelSet; dispatch.cpp picks one at run time.
#pragma once
#include <cstdint>

namespace tritlm {

// Weight layout "tiles" (see tritlm/quant/layouts.py): 16 rows per tile, then 64-byte chunks
// over K, 16 columns per chunk. Byte 4r + j of a chunk holds, at bit 2p, the code (ternary + 1)
// of row r, column 16s + 4p + j.
constexpr int kTileRows = 16;
constexpr int kChunkCols = 16;
constexpr int kChunkBytes = 64;

// One ternary x int8 product: out[n][m] over rows [0, M) of the weights and n_tokens tokens.
// With sums set, the epilogue writes the raw int32 S = sum code * q; otherwise it writes
// out = ((float)S - (float)act_sum) / act_scale * row_scale, each step in float32.
struct Gemm {
  const uint8_t* tiles;  // [ceil(M / 16)][K / 16][64]
  int64_t M, K;
  const int8_t* q;  // [n_tokens][K]
  int64_t n_tokens;
  const float* act_scale;  // [n_tokens]
  const int32_t* act_sum;  // [n_tokens]
  const float* row_scale;  // [M]
  float* out;              // [n_tokens][M], or
  int32_t* sums;           // [n_tokens][M]
};

struct KernelSet {
  const char* name;
  // Quantizes one row of k floats; returns false (writing nothing useful) on NaN or infinity.
  bool (*quantize_row)(const float* x, int64_t k, int8_t* q, float* scale, int32_t* sum);
  // Computes the row tiles [tile_begin, tile_end) of g for every token.
  void (*gemm_tiles)(const Gemm& g, int64_t tile_begin, int64_t tile_end);
  // Reads n bytes (n a multiple of 64) as fast as it can; returns a checksum.
  uint64_t (*read_bytes)(const uint8_t* p, int64_t n);
};

KernelSet portable_kernels();
#if defined(__x86_64__) || defined(_M_X64)
KernelSet avx2_kernels();
KernelSet avx512_kernels();
#endif

// Helpers are static: each instruction-set file gets its own copy, so the linker can never
// hand an AVX-512 build of one to the portable path.

// Scale of the activation quantizer, as bitnet.cpp computes it: in double, then to float.
static inline float act_scale_from_max(float amax) {
  const double m = amax > 1e-5 ? double(amax) : 1e-5;
  return float(127.0 / m);
}

// One activation: round half to even (the default rounding mode), clamp to int8.
static inline int32_t quantize_value(float x, float scale) {
  const float v = __builtin_nearbyintf(x * scale);
  return v > 127.0f ? 127 : v < -128.0f ? -128 : int32_t(v);
}

// The float epilogue of one output, in the documented order.
static inline float rescale(int32_t sum, int32_t act_sum, float act_scale, float row_scale) {
  return (float(sum) - float(act_sum)) / act_scale * row_scale;
}

// Decode streams weights from DRAM, and the hardware prefetcher alone keeps too few lines in
// flight. A near prefetch into L1 plus a far one into L2 (which does not hold an L1 fill buffer
// for the whole trip) took one AVX-512 core from 8.9 to 15.5 GB/s, of 17.5 for a plain read.
constexpr int64_t kNearPrefetch = 1024, kFarPrefetch = 8192;

// Prefetches stop at `last`, the final line of this thread's slice: past it lie another
// thread's weights.
static inline void prefetch_ahead(const uint8_t* line, const uint8_t* last) {
  const uint8_t* near = line + kNearPrefetch;
  const uint8_t* far = line + kFarPrefetch;
  __builtin_prefetch(near < last ? near : last, 0, 3);  // into L1
  __builtin_prefetch(far < last ? far : last, 0, 1);    // into L2
}

// A slice starts with nothing in flight: ask for its first lines at once.
static inline void prefetch_start(const uint8_t* first, const uint8_t* last) {
  for (const uint8_t* p = first; p <= last && p < first + kFarPrefetch; p += kChunkBytes)
    __builtin_prefetch(p, 0, 1);
}

// Computes tiles [tile_begin, tile_end) for every token, in blocks of at most max_block tokens;
// block_kernels[b] handles a block of b tokens. Decode-sized calls prime the slice first.
using BlockKernel = void (*)(const Gemm& g, int64_t tile, int64_t t0, const uint8_t* last);

static inline void gemm_blocks(const Gemm& g, int64_t tile_begin, int64_t tile_end,
                               const BlockKernel* block_kernels, int64_t max_block) {
  const int64_t tile_bytes = g.K / kChunkCols * kChunkBytes;
  const uint8_t* last = g.tiles + tile_end * tile_bytes - kChunkBytes;
  if (g.n_tokens <= max_block) prefetch_start(g.tiles + tile_begin * tile_bytes, last);
  for (int64_t tile = tile_begin; tile < tile_end; ++tile)
    for (int64_t t0 = 0; t0 < g.n_tokens; t0 += max_block) {
      const int64_t block = g.n_tokens - t0 < max_block ? g.n_tokens - t0 : max_block;
      block_kernels[block](g, tile, t0, last);
    }
}

}  // namespace tritlm
