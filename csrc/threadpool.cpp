#include "threadpool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#else
static inline void cpu_relax() { std::this_thread::yield(); }
#endif

namespace tritlm {
namespace {

constexpr auto kSpin = std::chrono::microseconds(2000);  // then sleep until woken

class Pool {
 public:
  void run(int n_threads, TaskFn fn, void* ctx) {
    std::lock_guard<std::mutex> caller(call_mutex_);
    while (int(workers_.size()) < n_threads - 1) start_worker();
    fn_ = fn;
    ctx_ = ctx;
    n_threads_ = n_threads;
    pending_.store(n_threads - 1, std::memory_order_relaxed);
    for (int i = 0; i < n_threads - 1; ++i) workers_[i]->ticket.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    fn(ctx, 0, n_threads);
    while (pending_.load(std::memory_order_acquire) != 0) cpu_relax();
  }

 private:
  struct Worker {
    alignas(64) std::atomic<uint64_t> ticket{0};
    std::thread thread;
  };

  void start_worker() {
    const int index = int(workers_.size()) + 1;
    workers_.push_back(std::make_unique<Worker>());
    Worker* w = workers_.back().get();
    w->thread = std::thread([this, w, index] { loop(*w, index); });
  }

  void loop(Worker& w, int index) {
    uint64_t seen = 0;
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      int spins = 0;
      while (w.ticket.load(std::memory_order_acquire) == seen) {
        cpu_relax();
        if (++spins % 1024 == 0 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(sleep_mutex_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          wake_.wait(lock, [&] { return w.ticket.load(std::memory_order_seq_cst) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
          start = std::chrono::steady_clock::now();
        }
      }
      seen = w.ticket.load(std::memory_order_acquire);
      fn_(ctx_, index, n_threads_);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::mutex call_mutex_;
  std::vector<std::unique_ptr<Worker>> workers_;
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int n_threads_ = 1;
  std::atomic<int> pending_{0};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<int> sleepers_{0};
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: its threads live until the process exits
  return *p;
}

}  // namespace

void run_parallel(int n_threads, TaskFn fn, void* ctx) {
  if (n_threads <= 1) {
    fn(ctx, 0, 1);
    return;
  }
  pool().run(n_threads, fn, ctx);
}

}  // namespace tritlm
