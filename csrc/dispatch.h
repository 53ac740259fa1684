#pragma once
#include <string>
#include <vector>

#include "kernels.h"

namespace tritlm {

// Kernel sets this CPU can run, best first.
const std::vector<KernelSet>& available_kernels();

// The kernel set called `name`; throws std::invalid_argument if this CPU cannot run it.
const KernelSet& kernels_named(const std::string& name);

// g's product with ks on n_threads threads: the activations arranged first where ks wants them,
// every thread taking a share (done by each thread for every token, it would not shrink with
// more cores), then the row tiles.
void multiply(const KernelSet& ks, const Gemm& g, int n_threads);

}  // namespace tritlm
