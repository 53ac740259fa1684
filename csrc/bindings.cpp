// Python bindings: every argument is checked here, with the GIL held, and a bad one raises
// ValueError naming it. Kernels then run with the GIL released.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "checks.h"
#include "dispatch.h"
#include "memory.h"
#include "pack.h"
#include "threadpool.h"

namespace nb = nanobind;
using namespace tritlm;

namespace {

using namespace tritlm::checks;
using Held = nb::ndarray<nb::numpy, nb::ro>;  // an argument kept alive, shown to Python as NumPy
constexpr int64_t kMaxK = int64_t(1) << 18;  // keeps every int32 accumulator far from overflow

template <class T, class Array>
const T* checked(const Array& a, const char* name, std::vector<int64_t> shape) {
  return static_cast<const T*>(check(a, name, {nb::dtype<T>()}, std::move(shape)));
}

template <class Array>
std::string shape_str(const Array& a) { return dims_str(dims_of(a)); }

Layout layout_named(const std::string& name) {
  if (name == "tiles") return Layout::tiles;
  if (name == "tiles5") return Layout::tiles5;
  fail("layout must be 'tiles' or 'tiles5', got '" + name + "'");
}

void check_k(int64_t K) {
  if (K % 128 || K <= 0) fail("K (the row length) must be a positive multiple of 128, got " + std::to_string(K));
  if (K > kMaxK) fail("K must be at most " + std::to_string(kMaxK) + ", got " + std::to_string(K));
}

// A tiled ternary matrix, checked once when built; matmul calls then pass only this handle.
struct Weights {
  Held tiles, row_scale;
  int64_t M, K;
  Layout layout;

  Weights(const Input& tiles_, int64_t M_, const Input& row_scale_, const std::string& layout_)
      : tiles(tiles_), row_scale(row_scale_), M(M_), layout(layout_named(layout_)) {
    if (M < 1) fail("M must be positive, got " + std::to_string(M));
    const bool five = layout == Layout::tiles5;
    if (tiles.ndim() != 3)
      fail(std::string("tiles: expected shape (tiles, ") + (five ? "K / 256 * 13" : "K / 16") + ", 64), got " +
           shape_str(tiles));
    const int64_t chunks = int64_t(tiles.shape(1));
    K = five ? chunks / kBlock5Chunks * kBlock5Cols : chunks * kChunkCols;
    if (five && chunks % kBlock5Chunks)  // 13 chunks per 256 columns
      fail("tiles5: K (the row length) must be a positive multiple of 256, got tiles of " + shape_str(tiles));
    check_k(K);
    checked<uint8_t>(tiles, "tiles", {(M + kTileRows - 1) / kTileRows, chunks, kChunkBytes});
    checked<float>(row_scale, "row_scale", {M});
  }

  std::string layout_name() const { return layout == Layout::tiles5 ? "tiles5" : "tiles"; }
};

// Quantized activations of n tokens: q [n, K], scale [n], row_sum [n].
struct Activations {
  Held q, scale, row_sum;
  int64_t n, K;

  Activations(const Input& q_, const Input& scale_, const Input& row_sum_) : q(q_), scale(scale_), row_sum(row_sum_) {
    if (q.ndim() != 2) fail("q: expected shape (tokens, K), got " + shape_str(q));
    n = int64_t(q.shape(0));
    K = int64_t(q.shape(1));
    checked<int8_t>(q, "q", {n, K});
    checked<float>(scale, "scale", {n});
    checked<int32_t>(row_sum, "row_sum", {n});
  }
};

Gemm make_gemm(const Weights& w, const Activations& a) {
  if (a.K != w.K) fail("activations have K=" + std::to_string(a.K) + ", weights K=" + std::to_string(w.K));
  Gemm g{};
  g.tiles = static_cast<const uint8_t*>(w.tiles.data());
  g.layout = w.layout;
  g.M = w.M;
  g.K = w.K;
  g.q = static_cast<const int8_t*>(a.q.data());
  g.n_tokens = a.n;
  g.act_scale = static_cast<const float*>(a.scale.data());
  g.act_sum = static_cast<const int32_t*>(a.row_sum.data());
  g.row_scale = static_cast<const float*>(w.row_scale.data());
  return g;
}

void run_gemm(const Gemm& g, const KernelSet& ks, int n_threads) {
  nb::gil_scoped_release release;
  multiply(ks, g, n_threads);
}

}  // namespace

void register_ops(nb::module_& m);  // ops_bindings.cpp: the float ops
namespace tritlm {
void register_model(nb::module_& m);  // model.cpp: a whole forward step
}

NB_MODULE(_native, m) {
  m.doc() = "tritlm's C++ kernels";
  m.attr("TILE_ROWS") = kTileRows;
  m.attr("TILE_COLS") = kChunkCols;
  m.attr("TILE_CHUNK_BYTES") = kChunkBytes;
  m.attr("TILES5_BLOCK") = kBlock5Cols;
  m.attr("TILES5_CHUNKS") = kBlock5Chunks;
  m.attr("TILES5_LOOKUP") = [] {
    auto a = new_array<uint8_t>({6, 64});
    std::memcpy(a.data(), kTiles5Lookup.t, sizeof kTiles5Lookup.t);
    return a;
  }();

  m.def("best_layout", [](const std::string& isa) {
    return kernels_named(isa).best_layout == Layout::tiles5 ? "tiles5" : "tiles";
  }, nb::arg("isa"), "The weight layout this kernel set streams fastest on this CPU.");

  m.def("isas", [] {
    std::vector<std::string> names;
    for (const KernelSet& k : available_kernels()) names.push_back(k.name);
    return names;
  }, "Kernel sets this CPU can run, best first.");

  nb::class_<Weights>(m, "Weights",
                      "A tiled ternary matrix [M, K]: tiles [ceil(M/16), K/16, 64] (layout 'tiles') or "
                      "[ceil(M/16), K/256*13, 64] (layout 'tiles5'), row_scale [M].")
      .def(nb::init<const Input&, int64_t, const Input&, const std::string&>(), nb::arg("tiles"), nb::arg("M"),
           nb::arg("row_scale"), nb::arg("layout") = "tiles")
      .def_ro("M", &Weights::M)
      .def_ro("K", &Weights::K)
      .def_prop_ro("layout", &Weights::layout_name);

  nb::class_<Activations>(m, "Activations", "int8 activations of n tokens: q [n, K], scale [n], row_sum [n].")
      .def(nb::init<const Input&, const Input&, const Input&>(), nb::arg("q"), nb::arg("scale"), nb::arg("row_sum"))
      .def_prop_ro("q", [](const Activations& a) { return a.q; }, nb::rv_policy::reference)
      .def_prop_ro("scale", [](const Activations& a) { return a.scale; }, nb::rv_policy::reference)
      .def_prop_ro("row_sum", [](const Activations& a) { return a.row_sum; }, nb::rv_policy::reference);

  m.def("quantize", [](const Input& x, const std::string& isa, int n_threads) {
    const KernelSet& ks = kernels_named(isa);
    check_threads(n_threads);
    if (x.ndim() != 2) fail("x: expected shape (tokens, K), got " + shape_str(x));
    const int64_t n = int64_t(x.shape(0)), k = int64_t(x.shape(1));
    const float* xp = checked<float>(x, "x", {n, k});
    auto q = new_array<int8_t>({size_t(n), size_t(k)});
    auto scale = new_array<float>({size_t(n)});
    auto sum = new_array<int32_t>({size_t(n)});
    std::atomic<bool> finite{true};
    {
      nb::gil_scoped_release release;
      int8_t* qp = q.data();
      float* sp = scale.data();
      int32_t* up = sum.data();
      parallel_for(n_threads, n, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          if (!ks.quantize_row(xp + i * k, k, qp + i * k, sp + i, up + i)) finite = false;
      });
    }
    if (!finite) fail("x: activations contain NaN or infinity");
    return Activations(Input(q), Input(scale), Input(sum));
  }, nb::arg("x"), nb::arg("isa"), nb::arg("n_threads") = 1,
  "Per-row int8 quantization of float32 x [tokens, K].");

  m.def("gemm", [](const Weights& w, const Activations& a, const std::string& isa, int n_threads) {
    const KernelSet& ks = kernels_named(isa);
    check_threads(n_threads);
    Gemm g = make_gemm(w, a);
    auto out = new_array<float>({size_t(a.n), size_t(w.M)});
    g.out = out.data();
    run_gemm(g, ks, n_threads);
    return out;
  }, nb::arg("weights"), nb::arg("acts"), nb::arg("isa"), nb::arg("n_threads") = 1,
  "y[n, m] = ((float)S - (float)row_sum) / scale * row_scale, S = sum_k code[m, k] * q[n, k].");

  m.def("gemm_sums", [](const Weights& w, const Activations& a, const std::string& isa, int n_threads) {
    const KernelSet& ks = kernels_named(isa);
    check_threads(n_threads);
    Gemm g = make_gemm(w, a);
    auto sums = new_array<int32_t>({size_t(a.n), size_t(w.M)});
    g.sums = sums.data();
    run_gemm(g, ks, n_threads);
    return sums;
  }, nb::arg("weights"), nb::arg("acts"), nb::arg("isa"), nb::arg("n_threads") = 1,
  "The exact int32 sums S[n, m] behind gemm.");

  m.def("pack_tiles", [](const Output& tiles, nb::list parts, int64_t K, const std::string& layout_name, int n_threads) {
    check_threads(n_threads);
    check_k(K);
    const Layout target = layout_named(layout_name);
    if (target == Layout::tiles5 && K % kBlock5Cols) fail("tiles5: K must be a multiple of 256, got " + std::to_string(K));
    std::vector<PackPart> ps;
    int64_t M = 0;
    for (size_t i = 0; i < nb::len(parts); ++i) {
      const std::string what = "part " + std::to_string(i);
      const auto part = nb::cast<nb::tuple>(parts[i]);  // (layout, data, rows)
      const auto name = nb::cast<std::string>(part[0]);
      const auto rows = nb::cast<int64_t>(part[2]);
      SourceLayout layout;
      if (!source_layout_named(name, &layout)) fail(what + ": unknown layout " + name + " (int8, HF, I2_S, TQ2_0, TQ1_0)");
      if (!layout_fits(layout, K)) fail(what + ": K=" + std::to_string(K) + " does not fit " + name + " blocks");
      if (rows < 1) fail(what + ": rows must be positive");
      if (layout == SourceLayout::kHF && rows % 4) fail(what + ": HF packed weights need rows a multiple of 4");
      const Input data = input(part[1], "data");
      const void* p = layout == SourceLayout::kInt8 ? check(data, "data", {nb::dtype<int8_t>()}, {rows, K})
                                              : check(data, "data", {kU8}, {kAny});
      if (int64_t(data.size()) < layout_bytes(layout, rows, K))
        fail(what + ": " + std::to_string(data.size()) + " bytes of " + name + ", " + std::to_string(rows) + " rows need " +
             std::to_string(layout_bytes(layout, rows, K)));
      ps.push_back({layout, static_cast<const uint8_t*>(p), rows});
      M += rows;
    }
    if (ps.empty()) fail("no parts to pack");
    const int64_t chunks = target == Layout::tiles5 ? K / kBlock5Cols * kBlock5Chunks : K / kChunkCols;
    auto* out = static_cast<uint8_t*>(check(tiles, "tiles", {kU8}, {(M + kTileRows - 1) / kTileRows, chunks, kChunkBytes}));
    auto scales = new_array<float>({size_t(M)});
    std::vector<PackResult> results;
    {
      nb::gil_scoped_release release;
      results = pack_tiles(ps, K, target, out, scales.data(), n_threads);
    }
    nb::list flags;
    for (const PackResult& r : results) flags.append(nb::make_tuple(r.corrupt, r.mixed_scales, r.nonzero));
    return nb::make_tuple(scales, flags);
  }, nb::arg("tiles"), nb::arg("parts"), nb::arg("K"), nb::arg("layout") = "tiles", nb::arg("n_threads") = 1,
  "Packs parts (layout, data, rows), stacked by rows, into tiles of `layout` (tiles or tiles5). Returns (row scales [M], read from the file "
  "layouts' bytes and unset for int8 parts; one (corrupt, mixed_scales, nonzero) per part).");

  m.def("empty_streaming", [](size_t nbytes) {
    uint8_t* p = alloc_streaming(nbytes);
    nb::capsule owner(p, [](void* q) noexcept { free_streaming(static_cast<uint8_t*>(q)); });
    const size_t shape[1] = {nbytes};
    return nb::ndarray<nb::numpy, uint8_t>(p, 1, shape, owner);
  }, nb::arg("nbytes"),
  "An uninitialized uint8 buffer, 2 MiB aligned and backed by huge pages where possible.");

  m.def("read_seconds", [](const Input& buffer, const std::string& isa, int n_threads) {
    const KernelSet& ks = kernels_named(isa);
    check_threads(n_threads);
    if (buffer.ndim() != 1) fail("buffer: expected a flat uint8 array, got shape " + shape_str(buffer));
    const int64_t n = int64_t(buffer.shape(0)) / 64 * 64;
    const uint8_t* p = checked<uint8_t>(buffer, "buffer", {kAny});
    nb::gil_scoped_release release;
    std::atomic<uint64_t> checksum{0};
    const auto start = std::chrono::steady_clock::now();
    parallel_for(n_threads, n / 64, [&](int64_t begin, int64_t end) {
      checksum ^= ks.read_bytes(p + begin * 64, (end - begin) * 64);
    });
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
    return took.count();  // (the atomic checksum keeps the reads from being optimized away)
  }, nb::arg("buffer"), nb::arg("isa"), nb::arg("n_threads") = 1,
  "Seconds to read the whole buffer once with n_threads threads (a bandwidth probe).");

  register_ops(m);
  tritlm::register_model(m);
}
