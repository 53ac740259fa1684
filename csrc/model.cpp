// A whole forward step in C++: every layer, for the stacked new tokens of several sequences.
// It composes the same kernels and ops the Python engine calls one by one, in the same order,
// so the logits are bit for bit those of that path; what it removes is Python: ~15 calls per
// layer, their argument checks and temporary arrays.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "dispatch.h"
#include "ops.h"
#include "threadpool.h"

namespace nb = nanobind;

namespace tritlm {
namespace {

using Array = nb::ndarray<nb::device::cpu>;
using ReadOnly = nb::ndarray<nb::ro, nb::device::cpu>;  // (weights may be a read-only memory map)
using checks::fail;

// The array behind `obj`, never a converted copy (a cache must be written where it lives).
template <class A = Array>
A array(nb::handle obj, const std::string& name) {
  A a;
  if (!nb::try_cast(obj, a, /*convert=*/false))
    fail(name + (std::is_same_v<A, Array> ? ": expected a writable CPU array" : ": expected a CPU array"));
  if (a.size() == 0) return a;  // (an empty array's strides mean nothing)
  int64_t stride = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    if (a.shape(i) != 1 && a.stride(i) != stride) fail(name + ": must be C-contiguous");
    stride *= int64_t(a.shape(i));
  }
  return a;
}

template <class T>
const T* data_of(nb::handle obj, const std::string& name, size_t n) {
  const ReadOnly a = array<ReadOnly>(obj, name);
  if (a.dtype() != nb::dtype<T>() || a.size() != n)
    fail(name + ": expected " + std::to_string(n) + " elements of the right type");
  return static_cast<const T*>(a.data());
}

// A ternary matrix as the kernels take it (a Weights handle's pointers).
// f(t) for each token t in [begin, end) of `floats` floats each, on as many threads as that
// keeps busy: one at decode sizes, where the pool's hand-off costs more than the work; all of
// them for a prompt, where serial per-token work would cap the speedup of many cores (Amdahl).
template <class F>
void each_token(int n_threads, int64_t begin, int64_t end, int64_t floats, const F& f) {
  const int threads = int(std::clamp<int64_t>((end - begin) * floats >> 15, 1, n_threads));
  parallel_for(threads, end - begin, [&](int64_t b, int64_t e) {
    for (int64_t t = begin + b; t < begin + e; ++t) f(t);
  });
}

struct Matrix {
  nb::object owner;
  Layout layout;
  const uint8_t* tiles;
  const float* row_scale;
  int64_t M, K;
};

// Ternary matrices side by side, read from one input: their outputs are concatenated per token.
// Each may normalize the input first with its own RMSNorm (a BitLinear input norm, or BitNet's
// sub-norm); matrices without one are stacked into a single matrix (one stream, one quantization).
struct Projection {
  const float* norm;  // may be null
  Matrix w;
};
using Projections = std::vector<Projection>;

// One block as models/arch.py states it; the optional norms are null where the architecture has none.
struct Layer {
  const float *attn_norm, *q_norm, *k_norm, *attn_post_norm, *ffn_norm, *ffn_post_norm;
  Projections qkv, attn_output, gate_up, ffn_down;
  double theta;    // RoPE
  int64_t window;  // keys a query sees at most; 0: all before it
};

class Model {
 public:
  Model(nb::dict dims, nb::list layers, nb::object embedding, const std::string& embedding_type,
        nb::object head, const std::string& head_type, nb::object output_norm)
      : keep_(nb::make_tuple(layers, embedding, head, output_norm)) {
    auto get = [&](const char* k) { return nb::cast<int64_t>(dims[k]); };
    D_ = get("hidden"), F_ = get("ffn"), Hq_ = get("heads"), Hkv_ = get("kv_heads");
    Dh_ = get("head_dim"), V_ = get("vocab");
    eps_ = nb::cast<double>(dims["eps"]), attn_scale_ = nb::cast<double>(dims["attention_scale"]);
    embed_scale_ = nb::cast<float>(dims["embedding_scale"]), neox_ = nb::cast<bool>(dims["neox"]);
    if (!ops::activation_named(nb::cast<std::string>(dims["activation"]), &activation_)) fail("unknown activation");
    // The step sizes every buffer from these: a file's tensors must fit them, never the reverse.
    if (D_ < 1 || F_ < 1 || Hq_ < 1 || Hkv_ < 1 || Dh_ < 2 || Dh_ % 2 || V_ < 1 || Hq_ % Hkv_)
      fail("the model's dimensions are not positive, or heads do not group over KV heads, or head_dim is odd");
    if (!(eps_ > 0) || !std::isfinite(eps_) || !(attn_scale_ > 0) || !std::isfinite(attn_scale_) ||
        !std::isfinite(embed_scale_))
      fail("the norm epsilon, attention scale and embedding scale must be positive and finite");
    if (!ops::weight_type_named(embedding_type, &embedding_type_) || !ops::weight_type_named(head_type, &head_type_))
      fail("unknown embedding or head type");
    if (D_ % ops::block_elements(embedding_type_) || D_ % ops::block_elements(head_type_))
      fail("the embedding and head rows must hold whole blocks of their type");
    embedding_ = bytes(embedding, "embedding", V_ * D_, embedding_type_);
    head_ = bytes(head, "head", V_ * D_, head_type_);
    output_norm_ = data_of<float>(output_norm, "output_norm", size_t(D_));
    for (nb::handle l : layers) layers_.push_back(layer(nb::cast<nb::dict>(l)));
  }

  // Logits [rows, V] (or, with hidden, the final normed hidden states [rows, D]) of the chosen
  // rows of the stacked tokens; tokens [bounds[p], bounds[p+1]) belong to caches[p], a
  // [layers, 2, n_ctx, Hkv, Dh] array, and go in at their positions.
  nb::ndarray<nb::numpy, float> forward(nb::handle ids_h, nb::handle positions_h, const std::vector<int64_t>& bounds,
                                        nb::list caches, nb::handle rows_h, const std::string& isa_name, int n_threads,
                                        bool hidden) {
    const KernelSet& ks = kernels_named(isa_name);
    const ops::Isa isa = ops::isa_named(isa_name);
    if (n_threads < 1) fail("n_threads must be positive");
    const int64_t T = int64_t(array(ids_h, "ids").size()), R = int64_t(array(rows_h, "rows").size());
    const int32_t* ids = data_of<int32_t>(ids_h, "ids", size_t(T));
    const int32_t* positions = data_of<int32_t>(positions_h, "positions", size_t(T));
    const int64_t* rows = data_of<int64_t>(rows_h, "rows", size_t(R));
    if (bounds.size() != nb::len(caches) + 1 || bounds.front() != 0 || bounds.back() != T)
      fail("bounds must split the tokens among the caches");
    for (int64_t t = 0; t < T; ++t)
      if (ids[t] < 0 || ids[t] >= V_) fail("token ids must be in [0, vocab)");
    std::vector<Cache> parts;
    for (size_t p = 0; p < nb::len(caches); ++p) parts.push_back(cache(caches[p], bounds[p], bounds[p + 1], positions));
    for (int64_t r = 0; r < R; ++r)
      if (rows[r] < 0 || rows[r] >= T) fail("rows must index the tokens");
    const int64_t width = hidden ? D_ : V_;
    float* result = new float[size_t(R * width + 1)];
    nb::capsule owner(result, [](void* p) noexcept { delete[] static_cast<float*>(p); });
    nb::ndarray<nb::numpy, float> out(result, {size_t(R), size_t(width)}, owner);
    {
      nb::gil_scoped_release release;
      run(ks, isa, n_threads, T, ids, positions, parts, R, rows, hidden, result);
    }
    return out;
  }

  // Seconds spent in each kind of op since the model was built (`tritlm bench` reports a step's share).
  nb::dict op_seconds() const {
    nb::dict d;
    d["ternary"] = times_.ternary, d["head"] = times_.head, d["attention"] = times_.attention, d["other"] = times_.other;
    return d;
  }

 private:
  struct Cache {
    uint8_t* base;  // [layers, 2, n_ctx, Hkv, Dh] of f16 or f32
    bool f16;
    int64_t n_ctx, begin, end;  // this part's tokens: [begin, end) of the stacked ones
  };

  // From a tritlm.kernels.TernaryMatrix: its tiles, per-row scales and shape.
  Matrix matrix(nb::handle ternary_matrix) {
    nb::object w = nb::borrow(ternary_matrix);
    const nb::tuple shape = nb::cast<nb::tuple>(w.attr("shape"));
    const int64_t M = nb::cast<int64_t>(shape[0]), K = nb::cast<int64_t>(shape[1]);
    const auto name = nb::cast<std::string>(w.attr("layout"));
    if (name != "tiles" && name != "tiles5") fail("unknown weight layout " + name);
    Gemm g{};
    g.layout = name == "tiles5" ? Layout::tiles5 : Layout::tiles, g.K = K;
    const size_t bytes = size_t((M + kTileRows - 1) / kTileRows * bytes_per_tile(g));
    return {w, g.layout, data_of<uint8_t>(w.attr("tiles"), "tiles", bytes),
            data_of<float>(w.attr("scale"), "scale", size_t(M)), M, K};
  }

  const uint8_t* bytes(nb::handle obj, const std::string& name, int64_t elements, ops::WeightType type) {
    const size_t n = size_t(elements / ops::block_elements(type) * ops::block_bytes(type));
    return data_of<uint8_t>(obj, name, n);
  }

  Layer layer(nb::dict d) {
    auto norm = [&](const char* k, int64_t n) -> const float* {
      if (!d.contains(k) || d[k].is_none()) return nullptr;
      return data_of<float>(d[k], k, size_t(n));
    };
    // (norm or None, TernaryMatrix) pairs whose outputs together are M x K
    auto projections = [&](const char* k, int64_t M, int64_t K) {
      Projections ps;
      int64_t rows = 0;
      for (nb::handle pair : nb::cast<nb::list>(d[k])) {
        const nb::tuple t = nb::cast<nb::tuple>(pair);
        const Matrix w = matrix(t[1]);
        if (w.K != K) fail(std::string(k) + ": a matrix of " + std::to_string(w.K) + " columns where " +
                           std::to_string(K) + " are needed");
        ps.push_back({t[0].is_none() ? nullptr : data_of<float>(t[0], k, size_t(K)), w});
        rows += w.M;
      }
      if (rows != M) fail(std::string(k) + ": " + std::to_string(rows) + " rows in all, the model needs " + std::to_string(M));
      return ps;
    };
    const int64_t qd = Hq_ * Dh_;
    Layer l{norm("attn_norm", D_), norm("attn_q_norm", Dh_), norm("attn_k_norm", Dh_),
            norm("post_attention_norm", D_), norm("ffn_norm", D_), norm("post_ffw_norm", D_),
            projections("qkv", qd + 2 * Hkv_ * Dh_, D_), projections("attn_output", D_, qd),
            projections("gate_up", 2 * F_, D_), projections("ffn_down", D_, F_),
            nb::cast<double>(d["theta"]), nb::cast<int64_t>(d["window"])};
    if (!l.attn_norm || !l.ffn_norm) fail("a layer lacks its norms");
    if (!(l.theta > 0) || !std::isfinite(l.theta) || l.window < 0) fail("a layer's RoPE theta or window is out of range");
    return l;
  }

  Cache cache(nb::handle obj, int64_t begin, int64_t end, const int32_t* positions) {
    const Array a = array(obj, "cache");
    const bool f16 = a.dtype().code == uint8_t(nb::dlpack::dtype_code::Float) && a.dtype().bits == 16;
    if (!f16 && a.dtype() != nb::dtype<float>()) fail("a KV cache must be float16 or float32");
    if (a.ndim() != 5 || int64_t(a.shape(0)) != int64_t(layers_.size()) || a.shape(1) != 2 ||
        int64_t(a.shape(3)) != Hkv_ || int64_t(a.shape(4)) != Dh_)
      fail("a KV cache must be [layers, 2, n_ctx, kv heads, head dim]");
    const int64_t n_ctx = int64_t(a.shape(2));
    for (int64_t t = begin; t < end; ++t)
      if (positions[t] < 0 || positions[t] >= n_ctx) fail("a position lies outside its cache");
    return {static_cast<uint8_t*>(a.data()), f16, n_ctx, begin, end};
  }

  // y [T, M] = W x for the rows of x [T, K] (quantized per row first)
  void linear(const KernelSet& ks, const Matrix& w, const float* x, int64_t T, float* y, int n_threads) {
    q_.resize(size_t(T * w.K));
    act_scale_.resize(size_t(T));
    act_sum_.resize(size_t(T));
    each_token(n_threads, 0, T, w.K, [&](int64_t t) {
      ks.quantize_row(x + t * w.K, w.K, q_.data() + t * w.K, &act_scale_[t], &act_sum_[t]);
    });
    Gemm g{};
    g.tiles = w.tiles, g.layout = w.layout, g.M = w.M, g.K = w.K, g.q = q_.data(), g.n_tokens = T;
    g.act_scale = act_scale_.data(), g.act_sum = act_sum_.data(), g.row_scale = w.row_scale, g.out = y;
    multiply(ks, g, n_threads);
  }

  // y [T, sum of M] = the projections of x [T, K], side by side per token
  void project(const KernelSet& ks, ops::Isa isa, const Projections& ps, const float* x, int64_t T, float* y, int nt) {
    if (ps.size() == 1 && !ps[0].norm) return linear(ks, ps[0].w, x, T, y, nt);
    int64_t total = 0, offset = 0;
    for (const Projection& p : ps) total += p.w.M;
    for (const Projection& p : ps) {
      const int64_t K = p.w.K, M = p.w.M;
      const float* in = x;
      if (p.norm) {
        normed_.resize(size_t(T * K));
        ops::rms_norm(isa, x, p.norm, T, K, eps_, normed_.data(), nt);
        in = normed_.data();
      }
      part_.resize(size_t(T * M));
      linear(ks, p.w, in, T, part_.data(), nt);
      each_token(nt, 0, T, M, [&](int64_t t) { std::memcpy(&y[t * total + offset], &part_[t * M], sizeof(float) * M); });
      offset += M;
    }
  }

  // x += d, or x += norm(d) where the block norms its outputs (scratch: [T, D])
  void residual(ops::Isa isa, float* x, const float* d, const float* post_norm, int64_t T, float* scratch, int nt) {
    if (post_norm) {
      ops::rms_norm(isa, d, post_norm, T, D_, eps_, scratch, nt);
      d = scratch;
    }
    each_token(nt, 0, T, D_, [&](int64_t t) {
      for (int64_t i = t * D_; i < (t + 1) * D_; ++i) x[i] += d[i];
    });
  }

  struct OpTimes {
    double ternary = 0, head = 0, attention = 0, other = 0;  // the last: norms, embedding, activation, residuals
  };

  // Charges the time since the previous lap to one kind of op (~25 ns a lap, ~10 laps a layer).
  struct Laps {
    std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();
    void operator()(double& total) {
      const auto now = std::chrono::steady_clock::now();
      total += std::chrono::duration<double>(now - last).count();
      last = now;
    }
  };

  void run(const KernelSet& ks, ops::Isa isa, int nt, int64_t T, const int32_t* ids, const int32_t* positions,
           const std::vector<Cache>& parts, int64_t R, const int64_t* rows, bool hidden, float* result) {
    Laps lap;
    OpTimes& tm = times_;
    const int64_t qd = Hq_ * Dh_, kvd = Hkv_ * Dh_, M = qd + 2 * kvd;
    std::vector<float> x(size_t(T * D_)), h(size_t(T * D_)), qkv(size_t(T * M)), q(size_t(T * qd)),
        k(size_t(T * kvd)), v(size_t(T * kvd)), a(size_t(T * qd)), y(size_t(T * std::max(D_, 2 * F_))),
        f(size_t(T * F_));
    ops::embedding_rows(isa, embedding_, D_, embedding_type_, ids, T, x.data());
    if (embed_scale_ != 1.0f)
      for (float& e : x) e *= embed_scale_;
    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& L = layers_[li];
      ops::rms_norm(isa, x.data(), L.attn_norm, T, D_, eps_, h.data(), nt);
      lap(tm.other);
      project(ks, isa, L.qkv, h.data(), T, qkv.data(), nt);
      lap(tm.ternary);
      each_token(nt, 0, T, M, [&](int64_t t) {  // q, k, v are stacked per token
        std::memcpy(&q[t * qd], &qkv[t * M], sizeof(float) * qd);
        std::memcpy(&k[t * kvd], &qkv[t * M + qd], sizeof(float) * kvd);
        std::memcpy(&v[t * kvd], &qkv[t * M + qd + kvd], sizeof(float) * kvd);
      });
      if (L.q_norm) ops::rms_norm(isa, q.data(), L.q_norm, T * Hq_, Dh_, eps_, q.data(), nt);  // per head
      if (L.k_norm) ops::rms_norm(isa, k.data(), L.k_norm, T * Hkv_, Dh_, eps_, k.data(), nt);
      ops::rope(q.data(), positions, T, Hq_, Dh_, L.theta, neox_, nt);
      ops::rope(k.data(), positions, T, Hkv_, Dh_, L.theta, neox_, nt);
      for (const Cache& c : parts) {
        const size_t row = size_t(Hkv_ * Dh_) * (c.f16 ? 2 : 4), plane = row * size_t(c.n_ctx);
        uint8_t* kc = c.base + (2 * li) * plane;
        uint8_t* vc = kc + plane;
        each_token(nt, c.begin, c.end, 2 * kvd, [&](int64_t t) {
          ops::store_rows(isa, &k[t * kvd], kvd, kc + positions[t] * row, c.f16);
          ops::store_rows(isa, &v[t * kvd], kvd, vc + positions[t] * row, c.f16);
        });
        ops::Attention at{&q[c.begin * qd], kc, vc, c.f16, positions + c.begin, c.end - c.begin,
                          Hq_, Hkv_, Dh_, &a[c.begin * qd], attn_scale_, L.window};
        ops::attention(isa, at, nt);
      }
      lap(tm.attention);
      project(ks, isa, L.attn_output, a.data(), T, y.data(), nt);
      lap(tm.ternary);
      residual(isa, x.data(), y.data(), L.attn_post_norm, T, h.data(), nt);
      ops::rms_norm(isa, x.data(), L.ffn_norm, T, D_, eps_, h.data(), nt);
      lap(tm.other);
      project(ks, isa, L.gate_up, h.data(), T, y.data(), nt);
      lap(tm.ternary);
      each_token(nt, 0, T, 2 * F_, [&](int64_t t) {  // gate then up, per token
        ops::gated(isa, &y[t * 2 * F_], &y[t * 2 * F_ + F_], F_, activation_, &f[t * F_], 1);
      });
      lap(tm.other);
      project(ks, isa, L.ffn_down, f.data(), T, h.data(), nt);
      lap(tm.ternary);
      residual(isa, x.data(), h.data(), L.ffn_post_norm, T, y.data(), nt);
      lap(tm.other);
    }
    std::vector<float> picked(size_t(R * D_)), normed(size_t(R * D_));
    for (int64_t r = 0; r < R; ++r) std::memcpy(&picked[r * D_], &x[rows[r] * D_], sizeof(float) * D_);
    ops::rms_norm(isa, picked.data(), output_norm_, R, D_, eps_, hidden ? result : normed.data(), nt);
    lap(tm.other);
    if (!hidden) ops::head_matmul(isa, normed.data(), R, D_, head_, V_, head_type_, result, nt);
    lap(tm.head);
  }

  nb::object keep_;  // every array the pointers below point into
  int64_t D_, F_, Hq_, Hkv_, Dh_, V_;
  double eps_, attn_scale_;
  float embed_scale_;
  bool neox_;
  ops::Activation activation_;
  const uint8_t *embedding_, *head_;
  ops::WeightType embedding_type_, head_type_;
  const float* output_norm_;
  std::vector<Layer> layers_;
  std::vector<float> normed_, part_;  // scratch of project()
  std::vector<int8_t> q_;  // scratch for quantized activations
  std::vector<float> act_scale_;
  std::vector<int32_t> act_sum_;
  OpTimes times_;
};

}  // namespace

void register_model(nb::module_& m) {
  nb::class_<Model>(m, "Model", "A whole forward step of a ternary transformer in C++.")
      .def(nb::init<nb::dict, nb::list, nb::object, const std::string&, nb::object, const std::string&, nb::object>(),
           nb::arg("dims"), nb::arg("layers"), nb::arg("embedding"), nb::arg("embedding_type"), nb::arg("head"),
           nb::arg("head_type"), nb::arg("output_norm"))
      .def("forward", &Model::forward, nb::arg("ids"), nb::arg("positions"), nb::arg("bounds"), nb::arg("caches"),
           nb::arg("rows"), nb::arg("isa"), nb::arg("n_threads"), nb::arg("hidden") = false)
      .def("op_seconds", &Model::op_seconds);
}

}  // namespace tritlm
