#include "threadpool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <time.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#else
static inline void cpu_relax() { std::this_thread::yield(); }
#endif

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
// Sleep while *word == value / wake every sleeper on word (std::atomic::wait is C++20).
static void futex_wait(std::atomic<int>* word, int value) {
  syscall(SYS_futex, reinterpret_cast<int*>(word), FUTEX_WAIT_PRIVATE, value, nullptr, nullptr, 0);
}
static void futex_wake(std::atomic<int>* word) {
  syscall(SYS_futex, reinterpret_cast<int*>(word), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
}
#else
static void futex_wait(std::atomic<int>*, int) { std::this_thread::yield(); }
static void futex_wake(std::atomic<int>*) {}
#endif

namespace tritlm {
namespace {

// CPU time this thread has had (wall time where the OS cannot say).
double thread_cpu_seconds() {
#if defined(__linux__)
  timespec t;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t) == 0) return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
#endif
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

constexpr auto kSpin = std::chrono::microseconds(2000);  // a worker's wait for the next call, then sleep
// A waiting worker offers its core every kYieldSpins pauses (~1-3 us): when another process holds
// the other core, the worker and the caller share one, and a worker that only spun took half of
// the caller's time between calls (measured, Xeon, one busy process beside a 2-thread decode:
// 2 threads 0.80x of 1 thread without yielding, 1.02-1.08x with). On an idle core a yield
// returns at once.
constexpr int kYieldSpins = 64;
constexpr int kCallerSpins = 2000;  // ~20-50 us of pauses before the caller sleeps on a late piece

// Under contention (another process on a core) the threads share the cores that are left, and a
// worker descheduled mid-piece holds up the caller; the caller alone, with a core to itself, can
// then be faster. So each call estimates its speedup over the caller alone: all pieces at the
// CPU time the caller's own pieces took, against the wall time. When two windows of calls in a
// row fall short of kWorthIt (one can be a fluke), the pool runs on the caller alone for a while,
// then tries its threads again: for kBackoffCalls calls at first, twice as long after each window
// that falls short again (up to kMaxBackoffCalls, so probing costs little while the contention
// lasts), back to kBackoffCalls after a window that pays.
constexpr int kWindowCalls = 64;
constexpr double kWorthIt = 1.15;
constexpr int kBackoffCalls = 2000, kMaxBackoffCalls = 32000;  // ~10 and ~200 decode steps of a 2B model

// Work is handed out through one atomic word: call generation (32 bits) | pieces (16) | next
// piece (16). A claim is a compare-exchange of that word, so a worker that wakes late, after
// its call has returned, finds the generation moved on or nothing left, and never touches the
// finished call's context.
class Pool {
 public:
  void run(int n_threads, int pieces, TaskFn fn, void* ctx) {
    std::lock_guard<std::mutex> caller(call_mutex_);
    if (backoff_ > 0) {
      --backoff_;
      for (int i = 0; i < pieces; ++i) fn(ctx, i);
      return;
    }
    while (int(workers_.size()) < n_threads - 1) start_worker();
    const auto start = std::chrono::steady_clock::now();
    const double cpu_start = thread_cpu_seconds();
    fn_ = fn;
    ctx_ = ctx;
    done_.store(0, std::memory_order_relaxed);
    work_.store(++generation_ << 32 | uint64_t(pieces) << 16, std::memory_order_release);
    for (int i = 0; i < n_threads - 1; ++i) workers_[i]->ticket.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    const int own = claim_pieces();
    const double own_cpu = thread_cpu_seconds() - cpu_start;
    wait_for(pieces);
    judge(own, pieces, own_cpu, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }

 private:
  struct Worker {
    alignas(64) std::atomic<uint64_t> ticket{0};
    std::thread thread;
  };

  // Runs unclaimed pieces until none is left; returns how many this thread ran.
  int claim_pieces() {
    int ran = 0;
    uint64_t w = work_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t next = w & 0xffff, pieces = w >> 16 & 0xffff;
      if (next >= pieces) return ran;
      if (work_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        fn_(ctx_, int(next));
        done_.fetch_add(1, std::memory_order_seq_cst);
        if (caller_asleep_.load(std::memory_order_seq_cst)) futex_wake(&done_);
        ++w;
        ++ran;
      }
    }
  }

  // The caller ran `own` of `pieces` in `own_cpu` seconds of CPU; the call took `wall` seconds.
  void judge(int own, int pieces, double own_cpu, double wall) {
    // Nothing to learn when one side ran every piece: the workers (no rate for the caller), or
    // the caller (a worker just started or woken: no parallel run to judge).
    if (own == 0 || own == pieces) return;
    alone_ += own_cpu * pieces / own;
    wall_ += wall;
    if (++calls_ < kWindowCalls) return;
    if (alone_ >= kWorthIt * wall_) {
      short_windows_ = 0;
      next_backoff_ = kBackoffCalls;
    } else if (++short_windows_ >= 2 || next_backoff_ > kBackoffCalls) {  // a probe that failed again
      backoff_ = next_backoff_;
      next_backoff_ = std::min(2 * next_backoff_, kMaxBackoffCalls);
      short_windows_ = 0;
    }
    calls_ = 0, alone_ = wall_ = 0.0;
  }

  // Every piece is claimed; wait for those still running elsewhere. A worker that the OS
  // preempted mid-piece (another process wants the core) may be off the CPU for milliseconds:
  // after a short spin the caller sleeps, which frees its core for that very worker.
  void wait_for(int pieces) {
    for (int spins = 0; spins < kCallerSpins; ++spins) {
      if (done_.load(std::memory_order_acquire) == pieces) return;
      cpu_relax();
    }
    caller_asleep_.store(true, std::memory_order_seq_cst);
    for (int d; (d = done_.load(std::memory_order_seq_cst)) != pieces;) futex_wait(&done_, d);
    caller_asleep_.store(false, std::memory_order_relaxed);
  }

  void start_worker() {
    workers_.push_back(std::make_unique<Worker>());
    Worker* w = workers_.back().get();
    w->thread = std::thread([this, w] { loop(*w); });
  }

  void loop(Worker& w) {
    uint64_t seen = 0;
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      int spins = 0;
      while (w.ticket.load(std::memory_order_acquire) == seen) {
        cpu_relax();
        if (++spins % kYieldSpins == 0) std::this_thread::yield();
        if (spins % 1024 == 0 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(sleep_mutex_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          wake_.wait(lock, [&] { return w.ticket.load(std::memory_order_seq_cst) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
          start = std::chrono::steady_clock::now();
        }
      }
      seen = w.ticket.load(std::memory_order_acquire);
      claim_pieces();
    }
  }

  std::mutex call_mutex_;
  std::vector<std::unique_ptr<Worker>> workers_;
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  uint64_t generation_ = 0;  // the caller's alone, as are the speedup tallies:
  int calls_ = 0, short_windows_ = 0, backoff_ = 0, next_backoff_ = kBackoffCalls;
  double alone_ = 0.0, wall_ = 0.0;
  alignas(64) std::atomic<uint64_t> work_{0};
  alignas(64) std::atomic<int> done_{0};  // pieces finished in this call
  std::atomic<bool> caller_asleep_{false};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<int> sleepers_{0};
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: its threads live until the process exits
  return *p;
}

}  // namespace

void run_parallel(int n_threads, int pieces, TaskFn fn, void* ctx) {
  if (n_threads <= 1) {
    for (int i = 0; i < pieces; ++i) fn(ctx, i);
    return;
  }
  pool().run(n_threads, pieces, fn, ctx);
}

}  // namespace tritlm
