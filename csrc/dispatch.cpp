#include "dispatch.h"

#include <stdexcept>

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

}  // namespace tritlm
