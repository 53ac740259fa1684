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

// Weight layout "tiles5" (1.625 bits per weight; see tritlm/quant/layouts.py): the same 16-row
// tiles, each a run of 256-column blocks of 13 chunks. Byte 4r + j of chunk i holds byte
// m = 4i + j of row r's block in TQ1_0's order, that is the codes of columns tq1_column(m, n)
// for n = 0..4 (n = 0..3 in chunk 12, bytes 48..51), in a byte code decoded by 64-entry lookups
// of its low or high 6 bits (L = kTiles5Lookup):
//   code 0 = L[0][x & 63], code 1 = L[1][x & 63], code 2 = L[2][x >> 2], code 3 = L[3][x >> 2],
//   code 4 = L[4][x & 63] + L[5][x >> 2].
// In one chunk, code n of 16 rows x 4 bytes pairs with 4 consecutive columns, as vpdpbusd wants.
constexpr int kBlock5Cols = 256;
constexpr int kBlock5Chunks = 13;
constexpr int kBlock5Bytes = kBlock5Chunks * kChunkBytes;

constexpr int tq1_column(int m, int n) { return m < 32 ? m + 32 * n : m < 48 ? 128 + m + 16 * n : 192 + m + 4 * n; }

struct Tiles5Lookup { uint8_t t[6][64]; };

constexpr Tiles5Lookup tiles5_lookup() {
  // found by a randomized search: every byte decodes to codes <= 2, and each of the 243 code
  // tuples has a byte (tests/test_tiles5.py checks both)
  const char* rows[6] = {"0210122012012100201011210200121011122101021202201002120021202221",
                         "1021001101212210212012210002001012102201200122100210221200121120",
                         "0011020010211202101102120110022121120021122111002202102221200022",
                         "1001021112012111021221010012020022200210202210211000112202002112",
                         "2200000211110000000000011000000010021111000000101101201011111021",
                         "0011111001100010001111100000001000112010012000100010211001000010"};
  Tiles5Lookup l{};
  for (int i = 0; i < 6; ++i)
    for (int j = 0; j < 64; ++j) l.t[i][j] = uint8_t(rows[i][j] - '0');
  return l;
}
inline constexpr Tiles5Lookup kTiles5Lookup = tiles5_lookup();

enum class Layout : int32_t { tiles, tiles5 };

// One ternary x int8 product: out[n][m] over rows [0, M) of the weights and n_tokens tokens.
// With sums set, the epilogue writes the raw int32 S = sum code * q; otherwise it writes
// out = ((float)S - (float)act_sum) / act_scale * row_scale, each step in float32.
struct Gemm {
  const uint8_t* tiles;  // [ceil(M / 16)][K / 16][64], or [ceil(M / 16)][K / 256 * 13][64] (tiles5)
  Layout layout = Layout::tiles;
  int64_t M, K;
  const int8_t* q;  // [n_tokens][K]
  int64_t n_tokens;
  const float* act_scale;  // [n_tokens]
  const int32_t* act_sum;  // [n_tokens]
  const float* row_scale;  // [M]
  float* out;              // [n_tokens][M], or
  int32_t* sums;           // [n_tokens][M]
  bool arranged = false;   // q as the set's `arrange` writes it
};

constexpr int kArrangedGroup = 16;  // tokens per group of arranged activations

struct KernelSet {
  const char* name;
  // Quantizes one row of k floats; returns false (writing nothing useful) on NaN or infinity.
  bool (*quantize_row)(const float* x, int64_t k, int8_t* q, float* scale, int32_t* sum);
  // Computes the row tiles [tile_begin, tile_end) of g for every token, in g's layout, from
  // activations arranged where wants_arranged says so (call it through `multiply`).
  void (*gemm_tiles)(const Gemm& g, int64_t tile_begin, int64_t tile_end);
  // Reads n bytes (n a multiple of 64) as fast as it can; returns a checksum.
  uint64_t (*read_bytes)(const uint8_t* p, int64_t n);
  // The layout this set streams fastest: tiles5 where it decodes at memory speed (AVX512-VBMI).
  Layout best_layout = Layout::tiles;
  // Optional: products whose activations gemm_tiles wants rearranged first (`wants_arranged`),
  // which `arrange` does for token groups [group_begin, group_end) of kArrangedGroup tokens into
  // out ([n_tokens][K]); `multiply` runs it on every thread, then passes out as q with `arranged`.
  bool (*wants_arranged)(const Gemm& g) = nullptr;
  void (*arrange)(const Gemm& g, int64_t group_begin, int64_t group_end, int8_t* out) = nullptr;
};

KernelSet portable_kernels();
#if defined(__x86_64__) || defined(_M_X64)
KernelSet avx2_kernels();
KernelSet avx512_kernels();
// The AVX2 tiles5 product, which the AVX-512 set falls back to on CPUs without AVX512-VBMI.
void avx2_gemm_tiles5(const Gemm& g, int64_t tile_begin, int64_t tile_end);
#endif
#if defined(__aarch64__)
KernelSet neon_kernels();
KernelSet dotprod_kernels();  // ARMv8.2 SDOT
KernelSet i8mm_kernels();     // ARMv8.6 SMMLA (and SDOT for one token)
// Shared by the sets: the quantizer and the read need nothing past baseline ASIMD, and the i8mm
// set's one-token product is the dotprod one (every CPU with I8MM has DotProd).
bool neon_quantize_row(const float* x, int64_t k, int8_t* q, float* scale, int32_t* sum);
uint64_t neon_read_bytes(const uint8_t* p, int64_t n);
void dotprod_gemm_tiles(const Gemm& g, int64_t tile_begin, int64_t tile_end);
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

// Bytes of one 16-row tile of g's weights.
static inline int64_t bytes_per_tile(const Gemm& g) {
  return g.layout == Layout::tiles5 ? g.K / kBlock5Cols * kBlock5Bytes : g.K / kChunkCols * kChunkBytes;
}

// Computes tiles [tile_begin, tile_end) for every token, in blocks of at most max_block tokens;
// block_kernels[b] handles a block of b tokens. Decode-sized calls prime the slice first.
using BlockKernel = void (*)(const Gemm& g, int64_t tile, int64_t t0, const uint8_t* last);

// Activation bytes one pass over a slice's tiles reads: they stay in a 1 MB L2 beside the
// weights streaming through. Every tile reads all of them, so from L3 (many tokens: a batch of
// embedded texts) two threads would share its bandwidth and scale 1.5x.
constexpr int64_t kPassActivations = 256 << 10;

static inline void gemm_blocks(const Gemm& g, int64_t tile_begin, int64_t tile_end,
                               const BlockKernel* block_kernels, int64_t max_block) {
  const int64_t tile_bytes = bytes_per_tile(g);
  const uint8_t* last = g.tiles + tile_end * tile_bytes - kChunkBytes;
  if (g.n_tokens <= max_block) prefetch_start(g.tiles + tile_begin * tile_bytes, last);
  const int64_t fit = kPassActivations / g.K / max_block * max_block, pass = fit > max_block ? fit : max_block;
  for (int64_t p0 = 0; p0 < g.n_tokens; p0 += pass) {
    const int64_t p1 = g.n_tokens - p0 < pass ? g.n_tokens : p0 + pass;
    for (int64_t tile = tile_begin; tile < tile_end; ++tile)
      for (int64_t t0 = p0; t0 < p1; t0 += max_block) {
        const int64_t block = p1 - t0 < max_block ? p1 - t0 : max_block;
        block_kernels[block](g, tile, t0, last);
      }
  }
}

}  // namespace tritlm
