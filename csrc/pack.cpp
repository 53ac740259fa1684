#include "pack.h"

#include <cstring>
#include <vector>

#include "kernels.h"
#include "ops.h"
#include "threadpool.h"

namespace tritlm {
namespace {

constexpr int64_t kI2sBlock = 128, kTqBlock = 256, kTq2Bytes = 66, kTq1Bytes = 54;

// Each decoder writes the K codes of row m of a part: 0, 1, 2, or 3 where the bytes hold no
// ternary value. The loops are plain so that the compiler vectorizes them.
void decode_int8(const PackPart& p, int64_t m, int64_t K, uint8_t* codes) {
  const uint8_t* row = p.data + m * K;
  for (int64_t k = 0; k < K; ++k) {
    const uint8_t c = uint8_t(row[k] + 1);  // -1, 0, 1 -> 0, 1, 2
    codes[k] = c > 2 ? 3 : c;
  }
}

// HF: row m sits at bits 2i of row m - i * rows / 4, i = m / (rows / 4).
void decode_hf(const PackPart& p, int64_t m, int64_t K, uint8_t* codes) {
  const int64_t quarter = p.rows / 4;
  const uint8_t* row = p.data + (m % quarter) * K;
  const int shift = int(2 * (m / quarter));
  for (int64_t k = 0; k < K; ++k) codes[k] = (row[k] >> shift) & 3;
}

// I2_S: blocks of 128 elements in 32 bytes; element 32g + p at bit 6 - 2g of byte p.
void decode_i2s(const PackPart& p, int64_t m, int64_t K, uint8_t* codes) {
  const uint8_t* block = p.data + m * K / 4;
  for (int64_t b = 0; b < K / kI2sBlock; ++b, block += 32, codes += kI2sBlock)
    for (int g = 0; g < 4; ++g)
      for (int i = 0; i < 32; ++i) codes[32 * g + i] = (block[i] >> (6 - 2 * g)) & 3;
}

// TQ2_0: blocks of 256 elements in 64 bytes + an f16 scale; in half h, element 128h + 32n + i at
// bit 2n of byte 32h + i.
void decode_tq2_0(const PackPart& p, int64_t m, int64_t K, uint8_t* codes) {
  const uint8_t* block = p.data + m * (K / kTqBlock) * kTq2Bytes;
  for (int64_t b = 0; b < K / kTqBlock; ++b, block += kTq2Bytes, codes += kTqBlock)
    for (int h = 0; h < 2; ++h)
      for (int n = 0; n < 4; ++n)
        for (int i = 0; i < 32; ++i) codes[128 * h + 32 * n + i] = (block[32 * h + i] >> (2 * n)) & 3;
}

// TQ1_0: blocks of 256 elements in 52 bytes + an f16 scale. Groups of bytes hold 5 (or 4) trits
// each, trit n of byte i being element start + bytes * n + i; trit n is the top trit of
// (uint8)(byte * 3^n), read as (x * 3) >> 8.
void decode_tq1_0(const PackPart& p, int64_t m, int64_t K, uint8_t* codes) {
  struct Group { int start, bytes, trits, offset; };
  constexpr Group groups[] = {{0, 32, 5, 0}, {160, 16, 5, 32}, {240, 4, 4, 48}};
  const uint8_t* block = p.data + m * (K / kTqBlock) * kTq1Bytes;
  for (int64_t b = 0; b < K / kTqBlock; ++b, block += kTq1Bytes, codes += kTqBlock)
    for (const Group& g : groups)
      for (int n = 0, power = 1; n < g.trits; ++n, power *= 3)
        for (int i = 0; i < g.bytes; ++i)
          codes[g.start + g.bytes * n + i] = uint8_t((uint8_t(block[g.offset + i] * power) * 3) >> 8);
}

using Decoder = void (*)(const PackPart&, int64_t, int64_t, uint8_t*);

Decoder decoder(SourceLayout layout) {
  switch (layout) {
    case SourceLayout::kInt8: return decode_int8;
    case SourceLayout::kHF: return decode_hf;
    case SourceLayout::kI2_S: return decode_i2s;
    case SourceLayout::kTQ2_0: return decode_tq2_0;
    case SourceLayout::kTQ1_0: return decode_tq1_0;
  }
  return nullptr;
}

// A TQ row's scale from its blocks' f16 scales, as layouts.py reads them: the largest, which
// every nonzero block must share (an all-zero block's scale is 0). False if one does not.
bool tq_row_scale(const uint8_t* row, int64_t blocks, int64_t block_bytes, float* scale) {
  auto block_scale = [&](int64_t b) {
    uint16_t h;
    std::memcpy(&h, row + b * block_bytes + block_bytes - 2, 2);
    return ops::half_to_float(h);
  };
  float best = 0;
  for (int64_t b = 0; b < blocks; ++b) best = block_scale(b) > best ? block_scale(b) : best;
  bool same = true;
  for (int64_t b = 0; b < blocks; ++b) same &= block_scale(b) == 0 || block_scale(b) == best;  // NaN: false
  *scale = best;
  return same;
}

// One 16-row tile of codes [16][K] in the 2-bit layout: byte 4r + j of chunk s holds, at bit 2q,
// the code of row r, column 16s + 4q + j (four 4-byte words of a row's codes, shifted into
// place; a code < 4 never carries into the next byte).
void write_tiles(const uint8_t* codes, int64_t K, uint8_t* out) {
  for (int64_t s = 0; s < K / kChunkCols; ++s)
    for (int64_t r = 0; r < kTileRows; ++r) {
      uint32_t w[4];
      std::memcpy(w, codes + r * K + s * kChunkCols, sizeof w);
      const uint32_t packed = w[0] | w[1] << 2 | w[2] << 4 | w[3] << 6;
      std::memcpy(out + s * kChunkBytes + 4 * r, &packed, 4);
    }
}

// tiles5's byte for each tuple of five codes (index 81 c0 + 27 c1 + 9 c2 + 3 c3 + c4): the
// smallest byte the kernels' lookups decode to it (layouts.py's reference packs the same).
struct Tiles5Encoder {
  uint8_t byte[243];
  Tiles5Encoder() {
    const auto& L = kTiles5Lookup.t;
    for (int x = 255; x >= 0; --x) {
      const int lo = x & 63, hi = x >> 2;
      const int c[5] = {L[0][lo], L[1][lo], L[2][hi], L[3][hi], L[4][lo] + L[5][hi]};
      if (c[0] <= 2 && c[1] <= 2 && c[2] <= 2 && c[3] <= 2 && c[4] <= 2)
        byte[81 * c[0] + 27 * c[1] + 9 * c[2] + 3 * c[3] + c[4]] = uint8_t(x);
    }
  }
};

// The same tile in tiles5: byte 4r + j of chunk i of a 256-column block holds the five weights
// of row r's byte m = 4i + j in TQ1_0's order (kernels.h tq1_column): m < 32 holds columns
// m + 32n, m < 48 columns 160 + (m - 32) + 16n, and the last 4 bytes columns 240 + (m - 48) + 4n
// for n < 4 only (the fifth stored as code 0). Each group's tuple indices come from loops over
// consecutive columns with constant bounds, which vectorize.
template <int kFirstByte, int kBytes, int kFirstColumn, int kStride, int kWeights>
void tuple_indices(const uint8_t* c, uint8_t* index) {
  for (int i = 0; i < kBytes; ++i) {
    uint8_t v = 0;  // at most 242
    for (int n = 0; n < 5; ++n) v = uint8_t(3 * v + (n < kWeights ? c[kFirstColumn + i + kStride * n] : 0));
    index[kFirstByte + i] = v;
  }
}

void write_tiles5(const uint8_t* codes, int64_t K, uint8_t* out) {
  static const Tiles5Encoder encoder;
  for (int64_t b = 0; b < K / kBlock5Cols; ++b, out += kBlock5Bytes)
    for (int64_t r = 0; r < kTileRows; ++r) {
      const uint8_t* c = codes + r * K + b * kBlock5Cols;
      uint8_t index[52];
      tuple_indices<0, 32, 0, 32, 5>(c, index);
      tuple_indices<32, 16, 160, 16, 5>(c, index);
      tuple_indices<48, 4, 240, 4, 4>(c, index);
      for (int m = 0; m < 52; ++m) out[(m / 4) * kChunkBytes + 4 * r + m % 4] = encoder.byte[index[m]];
    }
}

enum Flag { kCorrupt = 1, kMixedScales = 2, kNonzero = 4 };

// Decodes row m of part p, its scale into *scale (file layouts), and returns its flags.
int decode_row(const PackPart& p, int64_t m, int64_t K, uint8_t* codes, float* scale) {
  decoder(p.layout)(p, m, K, codes);
  int flags = 0;
  if (p.layout == SourceLayout::kI2_S) {
    std::memcpy(scale, p.data + p.rows * K / 4, 4);  // one scale per tensor, after the codes
  } else if (p.layout == SourceLayout::kTQ2_0 || p.layout == SourceLayout::kTQ1_0) {
    const int64_t block_bytes = p.layout == SourceLayout::kTQ2_0 ? kTq2Bytes : kTq1Bytes;
    const int64_t blocks = K / kTqBlock;
    if (!tq_row_scale(p.data + m * blocks * block_bytes, blocks, block_bytes, scale)) flags |= kMixedScales;
  }
  uint8_t corrupt = 0, nonzero = 0;
  for (int64_t k = 0; k < K; ++k) {
    corrupt |= codes[k] == 3;
    nonzero |= codes[k] != 1;
  }
  return flags | (corrupt ? kCorrupt : 0) | (nonzero ? kNonzero : 0);
}

}  // namespace

bool source_layout_named(const std::string& name, SourceLayout* layout) {
  if (name == "int8") *layout = SourceLayout::kInt8;
  else if (name == "HF") *layout = SourceLayout::kHF;
  else if (name == "I2_S") *layout = SourceLayout::kI2_S;
  else if (name == "TQ2_0") *layout = SourceLayout::kTQ2_0;
  else if (name == "TQ1_0") *layout = SourceLayout::kTQ1_0;
  else return false;
  return true;
}

int64_t layout_bytes(SourceLayout layout, int64_t rows, int64_t K) {
  switch (layout) {
    case SourceLayout::kInt8: return rows * K;
    case SourceLayout::kHF: return rows * K / 4;
    case SourceLayout::kI2_S: return rows * K / 4 + 32;  // the 32-byte tail holds the f32 scale
    case SourceLayout::kTQ2_0: return rows * K / kTqBlock * kTq2Bytes;
    case SourceLayout::kTQ1_0: return rows * K / kTqBlock * kTq1Bytes;
  }
  return 0;
}

bool layout_fits(SourceLayout layout, int64_t K) {
  const int64_t block = layout == SourceLayout::kI2_S                                     ? kI2sBlock
                        : layout == SourceLayout::kInt8 || layout == SourceLayout::kHF ? kChunkCols
                                                                                       : kTqBlock;
  return K > 0 && K % block == 0;
}

std::vector<PackResult> pack_tiles(const std::vector<PackPart>& parts, int64_t K, Layout layout, uint8_t* tiles,
                                   float* scales, int n_threads) {
  std::vector<int64_t> starts{0};
  for (const PackPart& p : parts) starts.push_back(starts.back() + p.rows);
  const int64_t M = starts.back(), n_tiles = (M + kTileRows - 1) / kTileRows;
  const int64_t tile_bytes = layout == Layout::tiles5 ? K / kBlock5Cols * kBlock5Bytes : K / kChunkCols * kChunkBytes;
  std::vector<int> flags(parts.size(), 0);
  parallel_for(n_threads, n_tiles, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> codes(size_t(kTileRows * K));
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t r = 0; r < kTileRows; ++r) {
        uint8_t* c = codes.data() + r * K;
        const int64_t row = t * kTileRows + r;
        if (row >= M) {
          std::memset(c, 1, size_t(K));  // padding: weight 0
          continue;
        }
        size_t p = 0;
        while (row >= starts[p + 1]) ++p;
        __atomic_fetch_or(&flags[p], decode_row(parts[p], row - starts[p], K, c, scales + row), __ATOMIC_RELAXED);
      }
      if (layout == Layout::tiles5) write_tiles5(codes.data(), K, tiles + t * tile_bytes);
      else write_tiles(codes.data(), K, tiles + t * tile_bytes);
    }
  });
  std::vector<PackResult> results(parts.size());
  for (size_t p = 0; p < parts.size(); ++p)
    results[p] = {bool(flags[p] & kCorrupt), bool(flags[p] & kMixedScales), bool(flags[p] & kNonzero)};
  return results;
}

}  // namespace tritlm
