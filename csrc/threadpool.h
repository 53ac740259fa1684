// A persistent pool: workers spin briefly between calls (a decode step issues hundreds of
// kernel calls a few microseconds apart), then sleep. The calling thread is worker 0.
#pragma once
#include <cstdint>

namespace tritlm {

using TaskFn = void (*)(void* ctx, int thread, int n_threads);

// Runs fn(ctx, i, n_threads) for i in [0, n_threads) on n_threads threads and waits for all.
// Callers are serialized.
void run_parallel(int n_threads, TaskFn fn, void* ctx);

// Calls f(begin, end) on contiguous, nearly equal slices of [0, n) across n_threads threads.
template <class F>
void parallel_for(int n_threads, int64_t n, const F& f) {
  if (n_threads > n) n_threads = int(n > 0 ? n : 1);
  struct Ctx { const F* f; int64_t n; } ctx{&f, n};
  run_parallel(n_threads, [](void* p, int i, int nt) {
    auto* c = static_cast<Ctx*>(p);
    const int64_t begin = c->n * i / nt, end = c->n * (i + 1) / nt;
    if (begin < end) (*c->f)(begin, end);
  }, &ctx);
}

}  // namespace tritlm
