// Ternary tensors from the layouts they are stored in to the kernels' tiles (see kernels.h), in
// C++ and in one pass: a model's weights go from the file's bytes straight to where the kernels
// read them, with no int8 [M, K] copy in between.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kernels.h"

namespace tritlm {

// How a part's bytes hold its codes (ternary + 1): kInt8 is a plain int8 [rows, K] ternary
// array, kHF Hugging Face's packed uint8 [rows / 4, K]; the others are the GGUF layouts of
// tritlm/quant/layouts.py. kInt8 and kHF bytes hold no scales.
enum class SourceLayout { kInt8, kHF, kI2_S, kTQ2_0, kTQ1_0 };
bool source_layout_named(const std::string& name, SourceLayout* layout);
int64_t layout_bytes(SourceLayout layout, int64_t rows, int64_t K);  // the bytes a part needs
bool layout_fits(SourceLayout layout, int64_t K);                   // K suits the layout's blocks

struct PackPart {
  SourceLayout layout;
  const uint8_t* data;
  int64_t rows;
};

struct PackResult {
  bool corrupt = false;       // a code of 3 (no ternary value)
  bool mixed_scales = false;  // TQ1_0 / TQ2_0: nonzero block scales that differ within a row
  bool nonzero = false;       // a weight that is not zero
};

// Packs the parts, stacked by rows, into tiles of `layout` (kernels.h; M = the parts' rows, and
// rows past M get weight 0), and writes each GGUF part's row scales into scales [M] (int8 and HF
// parts' rows are left alone: their scales are not in their bytes). One result per part.
std::vector<PackResult> pack_tiles(const std::vector<PackPart>& parts, int64_t K, Layout layout, uint8_t* tiles,
                                   float* scales, int n_threads);

}  // namespace tritlm
