// A persistent pool of worker threads for the forward pass. The calling thread works too.
// Between ops of one forward call workers spin (no sleeping between ops of a token); after a
// short idle spell they sleep on a condition variable until the next job.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace alpaca {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);  // n_threads includes the caller
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Runs fn(task, thread_index) for task in [0, n_tasks), tasks handed out dynamically.
  // Returns when all tasks are done. Not re-entrant.
  void parallel_for(int64_t n_tasks, const std::function<void(int64_t, int)>& fn);

 private:
  void worker_loop(int thread_index);
  void run_tasks(int thread_index);

  int n_threads_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t, int)>* job_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_task_{0};
  std::atomic<int> pending_workers_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
};

}  // namespace alpaca
