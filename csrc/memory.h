#pragma once
#include <cstddef>
#include <cstdint>

namespace tritlm {

// Uninitialized memory aligned to 2 MiB and, where the OS offers it, backed by transparent huge pages:
// streaming reads from it lose no bandwidth to TLB misses.
uint8_t* alloc_streaming(size_t nbytes);
void free_streaming(uint8_t* p);

}  // namespace tritlm
