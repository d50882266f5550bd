#include "thread_pool.h"

#include <sched.h>

#include <chrono>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ALPACA_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define ALPACA_PAUSE() asm volatile("yield")
#else
#define ALPACA_PAUSE() ((void)0)
#endif

namespace alpaca {

// How long an idle worker spins before sleeping: long enough to cover the gap between two
// ops of one token (Python is not involved there), short enough not to burn a core when idle.
static constexpr auto kSpinTime = std::chrono::microseconds(2000);
static constexpr int kTaskBits = 22;
static constexpr uint64_t kTaskMask = (uint64_t(1) << kTaskBits) - 1;

static uint64_t gen_of(uint64_t s) { return s >> (2 * kTaskBits); }
static int64_t n_tasks_of(uint64_t s) { return int64_t((s >> kTaskBits) & kTaskMask); }
static int64_t next_of(uint64_t s) { return int64_t(s & kTaskMask); }

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads < 1 ? 1 : n_threads) {
  for (int i = 1; i < n_threads_; i++) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

bool ThreadPool::run_one(uint64_t gen, int thread_index) {
  uint64_t s = state_.load(std::memory_order_acquire);
  for (;;) {
    if (gen_of(s) != gen || next_of(s) >= n_tasks_of(s)) return false;
    if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) break;
  }
  // The claim succeeded while `gen` was current, and the job cannot end before this task
  // finishes, so job_ still belongs to `gen`.
  (*job_)(next_of(s), thread_index);
  done_.fetch_add(1, std::memory_order_acq_rel);
  return true;
}

void ThreadPool::parallel_for(int64_t n_tasks, const std::function<void(int64_t, int)>& fn) {
  if (n_tasks <= 0) return;
  if (n_tasks > kMaxTasks) throw std::invalid_argument("ThreadPool: too many tasks");
  if (n_threads_ == 1 || n_tasks == 1) {
    for (int64_t t = 0; t < n_tasks; t++) fn(t, 0);
    return;
  }
  const uint64_t gen = (gen_of(state_.load()) + 1) & ((uint64_t(1) << 20) - 1);
  job_ = &fn;
  done_.store(0, std::memory_order_relaxed);
  // seq_cst store then load: either we see a sleeper and wake it, or it sees the new job.
  state_.store((gen << (2 * kTaskBits)) | (uint64_t(n_tasks) << kTaskBits));
  if (sleepers_.load() > 0) {
    std::lock_guard<std::mutex> lock(mutex_);
    wake_.notify_all();
  }
  while (run_one(gen, 0)) {
  }
  for (int polls = 0; done_.load(std::memory_order_acquire) != n_tasks; polls++) {
    if (polls < 4096) {
      ALPACA_PAUSE();
    } else {
      sched_yield();  // a worker holding a task was descheduled: give it the core
    }
  }
}

void ThreadPool::worker_loop(int thread_index) {
  uint64_t seen = gen_of(state_.load());
  for (;;) {
    const auto spin_until = std::chrono::steady_clock::now() + kSpinTime;
    int polls = 0;
    for (;;) {
      if (stop_.load(std::memory_order_relaxed)) return;
      const uint64_t s = state_.load(std::memory_order_acquire);
      if (gen_of(s) != seen) {
        seen = gen_of(s);
        break;
      }
      ALPACA_PAUSE();
      if (++polls % 256 == 0 && std::chrono::steady_clock::now() > spin_until) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return stop_.load() || gen_of(state_.load()) != seen; });
        sleepers_.fetch_sub(1);
      }
    }
    while (run_one(seen, thread_index)) {
    }
  }
}

}  // namespace alpaca
