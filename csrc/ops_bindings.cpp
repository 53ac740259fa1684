// Python bindings of the float ops (ops.h). As in bindings.cpp: every argument is checked here,
// with the GIL held, and a bad one raises ValueError naming it; the op then runs with the GIL
// released. Arrays arrive as plain handles so that even a non-array gets a ValueError.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace nb = nanobind;
using namespace tritlm;

namespace {

using namespace tritlm::checks;

int64_t dim(const Input& a, const char* name, size_t ndim, size_t i) {
  if (a.ndim() != ndim)
    fail(std::string(name) + ": expected " + str(int64_t(ndim)) + " dimensions, got shape " + dims_str(dims_of(a)));
  return int64_t(a.shape(i));
}

ops::WeightType weight_type(const std::string& name) {
  ops::WeightType type;
  if (!ops::weight_type_named(name, &type))
    fail("type: unknown weight type '" + name + "' (known: F32, F16, Q8_0, Q6_K)");
  return type;
}

// The bytes of a [vocab, D] matrix of `type`; returns its row size.
int64_t check_matrix(const Input& w, int64_t vocab, int64_t D, ops::WeightType type, const std::string& type_name) {
  if (vocab < 1) fail("vocab must be positive, got " + str(vocab));
  if (D < 1) fail("the row length D must be positive, got " + str(D));
  const int64_t block = ops::block_elements(type);
  if (D % block)
    fail("the row length D=" + str(D) + " is not a multiple of " + str(block) + " (" + type_name + " blocks)");
  const int64_t row_bytes = D / block * ops::block_bytes(type);
  check(w, "weight", {kU8}, {kAny});
  if (int64_t(w.shape(0)) != vocab * row_bytes)
    fail("weight: " + str(int64_t(w.shape(0))) + " bytes, but a [" + str(vocab) + ", " + str(D) + "] " + type_name +
         " matrix has " + str(vocab * row_bytes));
  return row_bytes;
}

// A KV cache [n_ctx, Hkv, D] of float16 or float32 (cache_v the same as cache_k); returns f16.
template <class Array> bool check_cache(const Array& k, const Array& v, std::vector<int64_t>* shape) {
  if (k.ndim() != 3) fail("cache_k: expected shape (n_ctx, n_kv_heads, head_dim), got " + dims_str(dims_of(k)));
  *shape = dims_of(k);
  if ((*shape)[0] < 1 || (*shape)[1] < 1 || (*shape)[2] < 1)
    fail("cache_k: every dimension must be positive, got " + dims_str(*shape));
  check(k, "cache_k", {kF16, kF32}, *shape);
  check(v, "cache_v", {k.dtype()}, *shape);
  return k.dtype() == kF16;
}

}  // namespace

void register_ops(nb::module_& m) {
  m.def("rms_norm", [](nb::handle x_, nb::handle weight_, double eps, const std::string& isa, int n_threads) {
    const ops::Isa set = ops::isa_named(isa);
    check_threads(n_threads);
    const Input x = input(x_, "x"), weight = input(weight_, "weight");
    const int64_t T = dim(x, "x", 2, 0), D = int64_t(x.shape(1));
    const float* xp = static_cast<const float*>(check(x, "x", {kF32}, {T, D}));
    const float* wp = static_cast<const float*>(check(weight, "weight", {kF32}, {D}));
    if (!(eps >= 0.0) || std::isinf(eps)) fail("eps must be finite and >= 0, got " + std::to_string(eps));
    auto out = new_array<float>({size_t(T), size_t(D)});
    nb::gil_scoped_release release;
    ops::rms_norm(set, xp, wp, T, D, eps, out.data(), n_threads);
    return out;
  }, nb::arg("x"), nb::arg("weight"), nb::arg("eps"), nb::arg("isa"), nb::arg("n_threads") = 1,
  "x [T, D] * (float)(1 / sqrt(mean(x^2) + eps)) * weight [D], the mean in double.");

  m.def("rope", [](nb::handle x_, nb::handle positions_, double theta, bool neox, int n_threads) {
    check_threads(n_threads);
    const Output x = output(x_, "x");
    if (x.ndim() != 3) fail("x: expected shape (tokens, heads, head_dim), got " + dims_str(dims_of(x)));
    const int64_t T = int64_t(x.shape(0)), H = int64_t(x.shape(1)), D = int64_t(x.shape(2));
    float* xp = static_cast<float*>(check(x, "x", {kF32}, {T, H, D}));
    if (D % 2) fail("x: head_dim must be even, got " + str(D));
    const int32_t* pos = static_cast<const int32_t*>(check(input(positions_, "positions"), "positions", {kI32}, {T}));
    if (!(theta > 0.0) || std::isinf(theta)) fail("theta must be finite and positive, got " + std::to_string(theta));
    nb::gil_scoped_release release;
    ops::rope(xp, pos, T, H, D, theta, neox, n_threads);
  }, nb::arg("x"), nb::arg("positions"), nb::arg("theta"), nb::arg("neox"), nb::arg("n_threads") = 1,
  "Rotates x [T, H, D] in place at positions [T]: pairs (i, i + D/2) if neox, else (2i, 2i + 1).");

  m.def("store_kv", [](nb::handle cache_k_, nb::handle cache_v_, nb::handle k_, nb::handle v_, int64_t start,
                       const std::string& isa) {
    const ops::Isa set = ops::isa_named(isa);
    const Output cache_k = output(cache_k_, "cache_k"), cache_v = output(cache_v_, "cache_v");
    std::vector<int64_t> shape;
    const bool f16 = check_cache(cache_k, cache_v, &shape);
    const Input k = input(k_, "k"), v = input(v_, "v");
    const int64_t T = dim(k, "k", 3, 0);
    const float* kp = static_cast<const float*>(check(k, "k", {kF32}, {T, shape[1], shape[2]}));
    const float* vp = static_cast<const float*>(check(v, "v", {kF32}, {T, shape[1], shape[2]}));
    if (start < 0 || start + T > shape[0])
      fail("rows " + str(start) + ".." + str(start + T - 1) + " are past the cache (n_ctx=" + str(shape[0]) + ")");
    const int64_t row = shape[1] * shape[2], n = T * row, bytes = (f16 ? 2 : 4) * start * row;
    uint8_t* dk = static_cast<uint8_t*>(cache_k.data()) + bytes;
    uint8_t* dv = static_cast<uint8_t*>(cache_v.data()) + bytes;
    nb::gil_scoped_release release;
    ops::store_rows(set, kp, n, dk, f16);
    ops::store_rows(set, vp, n, dv, f16);
  }, nb::arg("cache_k"), nb::arg("cache_v"), nb::arg("k"), nb::arg("v"), nb::arg("start_position"), nb::arg("isa"),
  "Writes k, v [T, Hkv, D] (float32) into cache rows start_position .. start_position + T - 1.");

  m.def("attention", [](nb::handle q_, nb::handle cache_k_, nb::handle cache_v_, nb::handle positions_,
                        const std::string& isa, int n_threads, double scale, int64_t window) {
    const ops::Isa set = ops::isa_named(isa);
    check_threads(n_threads);
    const Input cache_k = input(cache_k_, "cache_k"), cache_v = input(cache_v_, "cache_v"), q = input(q_, "q");
    std::vector<int64_t> shape;
    const bool f16 = check_cache(cache_k, cache_v, &shape);
    const int64_t n_ctx = shape[0], Hkv = shape[1], D = shape[2];
    const int64_t T = dim(q, "q", 3, 0), Hq = int64_t(q.shape(1));
    const float* qp = static_cast<const float*>(check(q, "q", {kF32}, {T, Hq, D}));
    if (Hq % Hkv || Hq == 0)
      fail("q: " + str(Hq) + " query heads do not group over the cache's " + str(Hkv) + " KV heads");
    const int32_t* pos = static_cast<const int32_t*>(check(input(positions_, "positions"), "positions", {kI32}, {T}));
    for (int64_t t = 0; t < T; ++t)
      if (pos[t] < 0 || pos[t] >= n_ctx)
        fail("positions[" + str(t) + "]=" + str(pos[t]) + " is past the cache (n_ctx=" + str(n_ctx) + ")");
    auto out = new_array<float>({size_t(T), size_t(Hq * D)});
    if (!(scale >= 0) || !std::isfinite(scale) || window < 0) fail("scale and window must be finite and >= 0");
    const ops::Attention a{qp, cache_k.data(), cache_v.data(), f16, pos, T, Hq, Hkv, D, out.data(), scale, window};
    nb::gil_scoped_release release;
    ops::attention(set, a, n_threads);
    return out;
  }, nb::arg("q"), nb::arg("cache_k"), nb::arg("cache_v"), nb::arg("positions"), nb::arg("isa"),
  nb::arg("n_threads") = 1, nb::arg("scale") = 0.0, nb::arg("window") = 0,
  "Causal GQA: q [T, Hq, D] at positions [T] over cache rows 0..position (the last `window` of them,\n"
  "if > 0), q . k scaled by `scale` (0: 1 / sqrt(D)); returns [T, Hq * D].");

  m.def("gated", [](nb::handle gate_, nb::handle up_, const std::string& activation, const std::string& isa,
                    int n_threads) {
    const ops::Isa set = ops::isa_named(isa);
    check_threads(n_threads);
    ops::Activation act;
    if (!ops::activation_named(activation, &act))
      fail("activation must be 'relu2', 'silu' or 'gelu_tanh', got '" + activation + "'");
    const Input gate = input(gate_, "gate"), up = input(up_, "up");
    const int64_t T = dim(gate, "gate", 2, 0), F = int64_t(gate.shape(1));
    const float* gp = static_cast<const float*>(check(gate, "gate", {kF32}, {T, F}));
    const float* up_p = static_cast<const float*>(check(up, "up", {kF32}, {T, F}));
    auto out = new_array<float>({size_t(T), size_t(F)});
    nb::gil_scoped_release release;
    ops::gated(set, gp, up_p, T * F, act, out.data(), n_threads);
    return out;
  }, nb::arg("gate"), nb::arg("up"), nb::arg("activation"), nb::arg("isa"), nb::arg("n_threads") = 1,
  "act(gate) * up in float32: act relu(g)^2 ('relu2'), g * sigmoid(g) ('silu') or GELU's tanh\n"
  "approximation ('gelu_tanh').");

  m.def("head_matmul", [](nb::handle x_, nb::handle weight_, int64_t vocab, const std::string& type_name,
                          const std::string& isa, int n_threads) {
    const ops::Isa set = ops::isa_named(isa);
    check_threads(n_threads);
    const ops::WeightType type = weight_type(type_name);
    const Input x = input(x_, "x"), weight = input(weight_, "weight");
    const int64_t T = dim(x, "x", 2, 0), D = int64_t(x.shape(1));
    const float* xp = static_cast<const float*>(check(x, "x", {kF32}, {T, D}));
    check_matrix(weight, vocab, D, type, type_name);
    const uint8_t* wp = static_cast<const uint8_t*>(weight.data());
    auto out = new_array<float>({size_t(T), size_t(vocab)});
    nb::gil_scoped_release release;
    ops::head_matmul(set, xp, T, D, wp, vocab, type, out.data(), n_threads);
    return out;
  }, nb::arg("x"), nb::arg("weight"), nb::arg("vocab"), nb::arg("type"), nb::arg("isa"), nb::arg("n_threads") = 1,
  "logits [T, vocab] = x [T, D] times the [vocab, D] matrix whose GGUF bytes (F32, F16, Q8_0, Q6_K) are weight.");

  m.def("embedding_rows", [](nb::handle weight_, int64_t vocab, int64_t D, const std::string& type_name,
                             nb::handle ids_, const std::string& isa) {
    const ops::Isa set = ops::isa_named(isa);
    const ops::WeightType type = weight_type(type_name);
    const Input weight = input(weight_, "weight"), ids = input(ids_, "token_ids");
    check_matrix(weight, vocab, D, type, type_name);
    const int64_t T = dim(ids, "token_ids", 1, 0);
    const int32_t* ip = static_cast<const int32_t*>(check(ids, "token_ids", {kI32}, {T}));
    for (int64_t t = 0; t < T; ++t)
      if (ip[t] < 0 || ip[t] >= vocab)
        fail("token_ids[" + str(t) + "]=" + str(ip[t]) + " is not below vocab=" + str(vocab));
    const uint8_t* wp = static_cast<const uint8_t*>(weight.data());
    auto out = new_array<float>({size_t(T), size_t(D)});
    nb::gil_scoped_release release;
    ops::embedding_rows(set, wp, D, type, ip, T, out.data());
    return out;
  }, nb::arg("weight"), nb::arg("vocab"), nb::arg("D"), nb::arg("type"), nb::arg("token_ids"), nb::arg("isa"),
  "Rows token_ids [T] of the [vocab, D] matrix whose GGUF bytes are weight, as float32 [T, D].");
}
