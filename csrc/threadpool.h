// A persistent pool: workers spin briefly between calls (a decode step issues hundreds of
// kernel calls a few microseconds apart), yielding their core to any thread that wants it, then sleep. The calling thread works too.
#pragma once
#include <algorithm>
#include <cstdint>

namespace tritlm {

using TaskFn = void (*)(void* ctx, int piece);

// Runs fn(ctx, piece) for every piece in [0, pieces) (pieces < 65536) on n_threads threads,
// each claiming the next unclaimed piece until none is left, and waits for all. Callers are
// serialized.
void run_parallel(int n_threads, int pieces, TaskFn fn, void* ctx);

// Calls f(begin, end) on contiguous slices of [0, n): kPiecesPerThread per thread, claimed as
// the threads go, so a thread that the OS preempts (on a machine shared with other work) holds
// up one small slice while the others take the rest, not half of every op.
constexpr int kPiecesPerThread = 4;

template <class F>
void parallel_for(int n_threads, int64_t n, const F& f) {
  if (n_threads > n) n_threads = int(n > 0 ? n : 1);
  const int64_t pieces = n_threads == 1 ? 1 : std::min<int64_t>(n, int64_t(n_threads) * kPiecesPerThread);
  struct Ctx { const F* f; int64_t n, pieces; } ctx{&f, n, pieces};
  run_parallel(n_threads, int(pieces), [](void* p, int piece) {
    auto* c = static_cast<Ctx*>(p);
    const int64_t begin = c->n * piece / c->pieces, end = c->n * (piece + 1) / c->pieces;
    if (begin < end) (*c->f)(begin, end);
  }, &ctx);
}

}  // namespace tritlm
