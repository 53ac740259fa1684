#pragma once
#include <string>
#include <vector>

#include "kernels.h"

namespace tritlm {

// Kernel sets this CPU can run, best first.
const std::vector<KernelSet>& available_kernels();

// The kernel set called `name`; throws std::invalid_argument if this CPU cannot run it.
const KernelSet& kernels_named(const std::string& name);

}  // namespace tritlm
