#include "memory.h"

#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace tritlm {

constexpr size_t kHugePage = size_t(2) << 20;

static size_t rounded(size_t n) { return (n + kHugePage - 1) / kHugePage * kHugePage; }

uint8_t* alloc_streaming(size_t nbytes) {
  const size_t size = rounded(nbytes ? nbytes : 1);
  void* p = std::aligned_alloc(kHugePage, size);
  if (!p) throw std::bad_alloc();
#if defined(__linux__)
  madvise(p, size, MADV_HUGEPAGE);  // advisory: without THP support the memory still works
#endif
  return static_cast<uint8_t*>(p);
}

void free_streaming(uint8_t* p) { std::free(p); }

}  // namespace tritlm
