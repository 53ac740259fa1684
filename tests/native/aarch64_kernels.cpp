// The aarch64 kernel sets (neon, dotprod, i8mm) against the portable set and against reference
// vectors, bit for bit. Built static by .ci/cross-compile-aarch64 and run under qemu-user with
// CPUs that have each set:
//
//   aarch64_kernels VECTORS [--expect SET] [--cases N]
//
// - detection: prints the sets this CPU runs; --expect fails unless SET is the best of them;
// - every set but portable, on random shapes (K up to 16384, 1-64 tokens, row counts that are
//   no multiple of any block, tile ranges split as threads split them) and on extreme
//   activations: quantizer and products equal to the portable set's, sums and floats alike;
// - the largest sums (K = 16384, every code 2 or 0, every activation 127 or -128): exact;
// - VECTORS (tests/native/make_vectors.py, on x86): the NumPy reference's quantized activations,
//   sums and products, and the x86 float ops' results: the NEON ops must give the bits of the
//   x86 SIMD ops (fused multiply-adds, same reduction order), the portable ops those of x86's.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "../../csrc/dispatch.h"
#include "../../csrc/kernels.h"
#include "../../csrc/ops.h"
#include "../../csrc/pack.h"

using namespace tritlm;

namespace {

int failures = 0, checks = 0;

#define CHECK(cond, ...)                                     \
  do {                                                       \
    ++checks;                                                \
    if (!(cond)) {                                           \
      if (++failures <= 30) {                                \
        std::printf("FAIL line %d: ", __LINE__);             \
        std::printf(__VA_ARGS__);                            \
        std::printf("\n");                                   \
      }                                                      \
    }                                                        \
  } while (0)

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <class T>
bool same_bits(const std::vector<T>& a, const void* b, size_t bytes) {
  return a.size() * sizeof(T) == bytes && std::memcmp(a.data(), b, bytes) == 0;
}

// ------------------------------------------------------------------------------ kernel runs

struct Packed {
  std::vector<uint8_t> tiles;
  std::vector<float> scale;
  int64_t M, K;
  Layout layout;
};

Packed pack(const std::vector<int8_t>& ternary, int64_t M, int64_t K, const std::vector<float>& scale, Layout layout) {
  Packed p{{}, scale, M, K, layout};
  const int64_t tiles = (M + kTileRows - 1) / kTileRows;
  const int64_t tile_bytes = layout == Layout::tiles5 ? K / kBlock5Cols * kBlock5Bytes : K / kChunkCols * kChunkBytes;
  p.tiles.assign(size_t(tiles * tile_bytes), 0);
  std::vector<float> unused(static_cast<size_t>(M));
  const auto results = pack_tiles({{SourceLayout::kInt8, reinterpret_cast<const uint8_t*>(ternary.data()), M}}, K,
                                  layout, p.tiles.data(), unused.data(), 1);
  CHECK(!results[0].corrupt, "packing");
  return p;
}

struct Acts {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;
};

Acts quantize(const KernelSet& ks, const std::vector<float>& x, int64_t T, int64_t K) {
  Acts a{std::vector<int8_t>(size_t(T * K)), std::vector<float>(size_t(T)), std::vector<int32_t>(size_t(T))};
  for (int64_t t = 0; t < T; ++t)
    CHECK(ks.quantize_row(x.data() + t * K, K, a.q.data() + t * K, a.scale.data() + t, a.sum.data() + t),
          "%s: quantize rejected finite activations", ks.name);
  return a;
}

// The product in both forms, the tiles computed in `split` ranges as threads would take them.
void product(const KernelSet& ks, const Packed& w, const Acts& a, int64_t T, int split, std::vector<int32_t>& sums,
             std::vector<float>& out) {
  sums.assign(size_t(T * w.M), 0);
  out.assign(size_t(T * w.M), 0.0f);
  Gemm g{w.tiles.data(), w.layout, w.M, w.K, a.q.data(), T, a.scale.data(), a.sum.data(), w.scale.data(), nullptr, nullptr};
  const int64_t tiles = (w.M + kTileRows - 1) / kTileRows;
  for (int pass = 0; pass < 2; ++pass) {
    Gemm h = g;
    if (pass == 0) h.sums = sums.data();
    else h.out = out.data();
    for (int i = 0; i < split; ++i) {
      const int64_t b = tiles * i / split, e = tiles * (i + 1) / split;
      if (b < e) ks.gemm_tiles(h, b, e);
    }
  }
}

const KernelSet& portable() {
  static const KernelSet p = portable_kernels();
  return p;
}

void random_cases(const std::vector<KernelSet>& sets, int n_cases, std::mt19937_64& rng) {
  auto uniform = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  std::normal_distribution<float> normal;
  const int64_t k_blocks[] = {1, 2, 3, 5, 8, 20, 54, 128};  // K = 128 x these: up to 16384
  for (int c = 0; c < n_cases; ++c) {
    const bool five = c % 8 == 7;  // tiles5 (the sets pass it to the portable kernel) now and then
    int64_t K = 128 * k_blocks[uniform(0, 7)];
    if (five) K = 256 * uniform(1, 4);
    const int64_t M = c % 3 == 0 ? 16 * uniform(1, 6) + uniform(1, 15) : uniform(1, 80);
    int64_t T = c % 2 ? uniform(1, 20) : uniform(21, 64);
    while (M * K * T > (4 << 20) && T > 1) T = (T + 1) / 2;  // (the portable kernel is slow under emulation)
    std::vector<int8_t> ternary(size_t(M * K));
    for (auto& v : ternary) v = int8_t(uniform(-1, 1));
    std::vector<float> scale(static_cast<size_t>(M)), x(static_cast<size_t>(T * K));
    for (auto& s : scale) s = std::uniform_real_distribution<float>(0.01f, 2.0f)(rng);
    for (int64_t t = 0; t < T; ++t) {
      const float magnitude = std::pow(10.0f, float(uniform(-6, 6)));
      for (int64_t k = 0; k < K; ++k) x[size_t(t * K + k)] = normal(rng) * magnitude;
    }
    if (c % 5 == 0) {  // extreme rows: all +1, all -1, an outlier, zeros
      for (int64_t k = 0; k < K; ++k) x[size_t(k)] = 1.0f;
      if (T > 1) for (int64_t k = 0; k < K; ++k) x[size_t(K + k)] = -1.0f;
      if (T > 2) x[size_t(2 * K + 5)] = 1e20f;
      if (T > 3) std::fill(x.begin() + 3 * K, x.begin() + 4 * K, 0.0f);
    }
    const Layout layout = five ? Layout::tiles5 : Layout::tiles;
    const Packed w = pack(ternary, M, K, scale, layout);
    const Acts ref = quantize(portable(), x, T, K);
    std::vector<int32_t> ref_sums, sums;
    std::vector<float> ref_out, out;
    product(portable(), w, ref, T, 1, ref_sums, ref_out);
    const int split = int(uniform(1, 3));
    for (const KernelSet& ks : sets) {
      const Acts a = quantize(ks, x, T, K);
      CHECK(same_bits(a.q, ref.q) && same_bits(a.scale, ref.scale) && same_bits(a.sum, ref.sum),
            "%s: quantize K=%lld T=%lld", ks.name, (long long)K, (long long)T);
      product(ks, w, ref, T, split, sums, out);
      CHECK(same_bits(sums, ref_sums) && same_bits(out, ref_out), "%s: product %s M=%lld K=%lld T=%lld split=%d",
            ks.name, five ? "tiles5" : "tiles", (long long)M, (long long)K, (long long)T, split);
    }
  }
  // the quantizer alone at any row length (the vector loops' tails)
  for (int c = 0; c < 40; ++c) {
    const int64_t K = uniform(1, 700), T = uniform(1, 3);
    std::vector<float> x(size_t(T * K));
    const float magnitude = std::pow(10.0f, float(uniform(-6, 30)));
    for (auto& v : x) v = normal(rng) * magnitude;
    const Acts ref = quantize(portable(), x, T, K);
    for (const KernelSet& ks : sets) {
      const Acts a = quantize(ks, x, T, K);
      CHECK(same_bits(a.q, ref.q) && same_bits(a.scale, ref.scale) && same_bits(a.sum, ref.sum), "%s: quantize K=%lld",
            ks.name, (long long)K);
    }
  }
  // NaN and infinity are refused
  for (const KernelSet& ks : sets)
    for (float bad : {NAN, INFINITY, -INFINITY}) {
      std::vector<float> x(300, 1.0f);
      x[299] = bad;
      int8_t q[300];
      float s;
      int32_t sum;
      CHECK(!ks.quantize_row(x.data(), 300, q, &s, &sum), "%s: quantize took %f", ks.name, double(bad));
    }
}

// Every code 2 (or 0, or 1) against every activation 127 (or -128): the largest sums there are
// at K = 16384, 2 x 127 x 16384 = 4161536, past any int16 intermediate.
void largest_sums(const std::vector<KernelSet>& sets) {
  const int64_t K = 16384, M = 5;
  const int codes[] = {2, 2, 0, 1};
  const int values[] = {127, -128, -128, 127};
  for (int c = 0; c < 4; ++c) {
    const Packed w = pack(std::vector<int8_t>(size_t(M * K), int8_t(codes[c] - 1)), M, K, std::vector<float>(M, 1.0f),
                          Layout::tiles);
    for (int64_t T : {1, 2, 3, 4, 5}) {
      Acts a{std::vector<int8_t>(size_t(T * K), int8_t(values[c])), std::vector<float>(size_t(T), 1.0f),
             std::vector<int32_t>(size_t(T), int32_t(values[c] * K))};
      for (const KernelSet& ks : sets) {
        std::vector<int32_t> sums;
        std::vector<float> out;
        product(ks, w, a, T, 1, sums, out);
        bool exact = true;
        for (int32_t s : sums) exact &= s == codes[c] * values[c] * K;
        CHECK(exact, "%s: largest sums code %d value %d T=%lld", ks.name, codes[c], values[c], (long long)T);
      }
    }
  }
}

// ------------------------------------------------------------------------ reference vectors

struct Blob {
  char dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;
  template <class T> std::vector<T> as() const {
    std::vector<T> v(data.size() / sizeof(T));
    std::memcpy(v.data(), data.data(), data.size());
    return v;
  }
};

std::map<std::string, Blob> read_vectors(const char* path) {
  std::map<std::string, Blob> m;
  FILE* f = std::fopen(path, "rb");
  if (!f) {
    std::printf("cannot open %s\n", path);
    std::exit(2);
  }
  uint16_t n;
  while (std::fread(&n, 2, 1, f) == 1) {
    std::string name(n, ' ');
    uint8_t head[2];
    bool ok = std::fread(name.data(), 1, n, f) == n && std::fread(head, 1, 2, f) == 2;
    Blob b{char(head[0]), std::vector<int64_t>(head[1]), {}};
    ok = ok && std::fread(b.shape.data(), 8, head[1], f) == head[1];
    int64_t count = 1;
    for (int64_t s : b.shape) count *= s;
    const int size = b.dtype == 'b' || b.dtype == 'B' ? 1 : b.dtype == 'H' ? 2 : 4;
    b.data.resize(size_t(count * size));
    ok = ok && std::fread(b.data.data(), 1, b.data.size(), f) == b.data.size();
    if (!ok) {
      std::printf("%s: truncated at %s\n", path, name.c_str());
      std::exit(2);
    }
    m[name] = std::move(b);
  }
  std::fclose(f);
  return m;
}

void kernel_vectors(const std::map<std::string, Blob>& v, const std::vector<KernelSet>& sets) {
  const int cases = v.at("kernel_cases").as<int32_t>()[0];
  for (int i = 0; i < cases; ++i) {
    auto get = [&](const char* name) -> const Blob& { return v.at("k" + std::to_string(i) + "." + name); };
    const Blob& ternary = get("ternary");
    const int64_t M = ternary.shape[0], K = ternary.shape[1], T = get("x").shape[0];
    const Packed w = pack(ternary.as<int8_t>(), M, K, get("row_scale").as<float>(), Layout::tiles);
    const std::vector<float> x = get("x").as<float>();
    for (const KernelSet& ks : sets) {
      const Acts a = quantize(ks, x, T, K);
      CHECK(same_bits(a.q, get("q").data.data(), get("q").data.size()) &&
                same_bits(a.scale, get("act_scale").data.data(), get("act_scale").data.size()) &&
                same_bits(a.sum, get("act_sum").data.data(), get("act_sum").data.size()),
            "%s: quantize, NumPy case %d", ks.name, i);
      std::vector<int32_t> sums;
      std::vector<float> out;
      product(ks, w, a, T, 2, sums, out);
      CHECK(same_bits(sums, get("sums").data.data(), get("sums").data.size()), "%s: sums, NumPy case %d", ks.name, i);
      CHECK(same_bits(out, get("out").data.data(), get("out").data.size()), "%s: products, NumPy case %d", ks.name, i);
    }
  }
  const Blob& x = v.at("quant.x");
  for (const KernelSet& ks : sets) {
    const Acts a = quantize(ks, x.as<float>(), x.shape[0], x.shape[1]);
    CHECK(same_bits(a.q, v.at("quant.q").data.data(), v.at("quant.q").data.size()) &&
              same_bits(a.scale, v.at("quant.act_scale").data.data(), v.at("quant.act_scale").data.size()) &&
              same_bits(a.sum, v.at("quant.act_sum").data.data(), v.at("quant.act_sum").data.size()),
          "%s: quantize, NumPy row length %lld", ks.name, (long long)x.shape[1]);
  }
}

// The float ops of `isa` against the x86 results tagged `tag`.
void ops_vectors(const std::map<std::string, Blob>& v, ops::Isa isa, const std::string& tag, const char* label) {
  auto expect = [&](const std::string& name, const std::vector<float>& got) {
    const Blob& b = v.at(tag + "." + name);
    CHECK(same_bits(got, b.data.data(), b.data.size()), "%s ops vs x86 %s: %s", label, tag.c_str(), name.c_str());
  };
  const Blob &x = v.at("norm.x"), &gate = v.at("gate");
  const int64_t T = x.shape[0], D = x.shape[1], n = gate.shape[0] * gate.shape[1];
  std::vector<float> out(size_t(T * D));
  ops::rms_norm(isa, x.as<float>().data(), v.at("norm.w").as<float>().data(), T, D, 1e-5, out.data(), 1);
  expect("norm", out);
  const std::pair<const char*, ops::Activation> acts[] = {
      {"relu2", ops::Activation::relu2}, {"silu", ops::Activation::silu}, {"gelu_tanh", ops::Activation::gelu_tanh}};
  for (const auto& [name, act] : acts) {
    out.assign(size_t(n), 0.0f);
    ops::gated(isa, gate.as<float>().data(), v.at("up").as<float>().data(), n, act, out.data(), 1);
    expect(std::string("gated.") + name, out);
  }
  const Blob& hx = v.at("head.x");
  const std::pair<const char*, ops::WeightType> heads[] = {
      {"F16", ops::WeightType::F16}, {"Q8_0", ops::WeightType::Q8_0}, {"Q6_K", ops::WeightType::Q6_K}};
  for (const auto& [name, type] : heads) {
    const int64_t V = 37;
    out.assign(size_t(hx.shape[0] * V), 0.0f);
    ops::head_matmul(isa, hx.as<float>().data(), hx.shape[0], hx.shape[1], v.at(std::string("head.") + name).data.data(),
                     V, type, out.data(), 1);
    expect(std::string("head.") + name, out);
  }
  const Blob &k = v.at("att.k"), &q = v.at("att.q");
  const int64_t Hkv = k.shape[1], hd = k.shape[2], tq = q.shape[0], Hq = q.shape[1];
  const std::vector<float> kf = k.as<float>(), vf = v.at("att.v").as<float>();
  std::vector<uint16_t> k16(kf.size()), v16(vf.size());
  ops::store_rows(isa, kf.data(), int64_t(kf.size()), k16.data(), true);
  ops::store_rows(isa, vf.data(), int64_t(vf.size()), v16.data(), true);
  const Blob& kv16 = v.at(tag + ".kv16");
  CHECK(same_bits(k16, kv16.data.data(), kv16.data.size()), "%s ops vs x86 %s: f16 cache rows", label, tag.c_str());
  const std::vector<int32_t> positions = v.at("att.positions").as<int32_t>();
  const std::vector<float> qf = q.as<float>();
  for (bool f16 : {true, false}) {
    out.assign(size_t(tq * Hq * hd), 0.0f);
    const ops::Attention a{qf.data(), f16 ? static_cast<const void*>(k16.data()) : kf.data(),
                           f16 ? static_cast<const void*>(v16.data()) : vf.data(), f16, positions.data(), tq, Hq, Hkv,
                           hd, out.data(), 0.0, 0};
    ops::attention(isa, a, 1);
    expect(f16 ? "att.f16" : "att.f32", out);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::printf("usage: %s VECTORS [--expect SET] [--cases N]\n", argv[0]);
    return 2;
  }
  const char* expect = nullptr;
  int n_cases = 60;
  for (int i = 2; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--expect")) expect = argv[i + 1];
    else if (!std::strcmp(argv[i], "--cases")) n_cases = std::atoi(argv[i + 1]);
  }
  std::string names;
  std::vector<KernelSet> sets;  // every set but portable, which is the oracle
  for (const KernelSet& ks : available_kernels()) {
    names += std::string(names.empty() ? "" : " ") + ks.name;
    if (std::strcmp(ks.name, "portable")) sets.push_back(ks);
  }
  std::printf("kernel sets this CPU runs: %s\n", names.c_str());
  if (expect && std::strcmp(available_kernels()[0].name, expect)) {
    std::printf("FAIL: expected '%s' to be detected first\n", expect);
    return 1;
  }
  std::mt19937_64 rng(17);
  random_cases(sets, n_cases, rng);
  largest_sums(sets);
  const auto vectors = read_vectors(argv[1]);
  kernel_vectors(vectors, sets);
  kernel_vectors(vectors, {portable()});
  const int ops_sets = vectors.at("ops_sets").as<int32_t>()[0];
  ops_vectors(vectors, ops::Isa::portable, "portable", "portable");
  if (ops_sets > 1) ops_vectors(vectors, ops::Isa::neon, "fused", "neon");
  else std::printf("(no x86 SIMD ops in the vectors: the NEON ops were not compared)\n");
  std::printf("%s: %d checks, %d failed (sets: %s)\n", failures ? "FAILED" : "ok", checks, failures, names.c_str());
  return failures ? 1 : 0;
}
