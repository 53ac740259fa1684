#include "dispatch.h"

#include <stdexcept>

#include "threadpool.h"

namespace tritlm {

const std::vector<KernelSet>& available_kernels() {
  static const std::vector<KernelSet> sets = [] {
    std::vector<KernelSet> s;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni"))
      s.push_back(avx512_kernels());
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) s.push_back(avx2_kernels());
#endif
    s.push_back(portable_kernels());
    return s;
  }();
  return sets;
}

const KernelSet& kernels_named(const std::string& name) {
  std::string known;
  for (const KernelSet& k : available_kernels()) {
    if (name == k.name) return k;
    known += known.empty() ? k.name : std::string(", ") + k.name;
  }
  throw std::invalid_argument("kernel set '" + name + "' is not available on this CPU (available: " +
                              known + ")");
}

void multiply(const KernelSet& ks, const Gemm& g, int n_threads) {
  Gemm h = g;
  thread_local std::vector<int8_t> arranged;  // (the pool runs one call at a time per caller)
  if (ks.wants_arranged && ks.wants_arranged(g)) {
    arranged.resize(size_t(g.n_tokens * g.K));
    int8_t* out = arranged.data();  // (named in the lambda, `arranged` would be each worker's own)
    const int64_t groups = (g.n_tokens + kArrangedGroup - 1) / kArrangedGroup;
    parallel_for(n_threads, groups, [&](int64_t b, int64_t e) { ks.arrange(g, b, e, out); });
    h.q = out;
    h.arranged = true;
  }
  parallel_for(n_threads, (g.M + kTileRows - 1) / kTileRows, [&](int64_t b, int64_t e) { ks.gemm_tiles(h, b, e); });
}

}  // namespace tritlm
