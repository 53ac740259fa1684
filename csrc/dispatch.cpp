#include "dispatch.h"

#include <stdexcept>

#include "threadpool.h"

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
// (the bits of <asm/hwcap.h>, for C libraries whose headers predate them)
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1 << 13)
#endif
#elif defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace tritlm {

#if defined(__aarch64__)
namespace {

struct ArmFeatures {
  bool dotprod = false, i8mm = false;
};

ArmFeatures arm_features() {
  ArmFeatures f;
#if defined(__linux__)
  f.dotprod = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
  f.i8mm = (getauxval(AT_HWCAP2) & HWCAP2_I8MM) != 0;
#elif defined(__APPLE__)
  auto has = [](const char* name) {
    int value = 0;
    size_t size = sizeof value;
    return sysctlbyname(name, &value, &size, nullptr, 0) == 0 && value != 0;
  };
  f.dotprod = has("hw.optional.arm.FEAT_DotProd");
  f.i8mm = has("hw.optional.arm.FEAT_I8MM");
#endif
  return f;
}

}  // namespace
#endif

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
#elif defined(__aarch64__)
    const ArmFeatures f = arm_features();
    if (f.i8mm && f.dotprod) s.push_back(i8mm_kernels());  // (the i8mm set's one-token kernel is SDOT)
    if (f.dotprod) s.push_back(dotprod_kernels());
    s.push_back(neon_kernels());
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
