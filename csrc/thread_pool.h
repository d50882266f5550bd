// A persistent pool of worker threads for the forward pass. The calling thread works too.
// Between ops of one forward call workers spin (no sleeping between ops of a token); after a
// short idle spell they sleep on a condition variable until the next job.
//
// Completion is counted in finished tasks, not in workers checking in: a worker that the OS
// has descheduled (a shared, noisy machine) never holds up a job it took no part in.
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
  // Returns when all tasks are done. Not re-entrant. n_tasks < 2^22.
  void parallel_for(int64_t n_tasks, const std::function<void(int64_t, int)>& fn);

  static constexpr int64_t kMaxTasks = (int64_t(1) << 22) - 1;

 private:
  void worker_loop(int thread_index);
  // Claims and runs tasks of the job whose generation is `gen`; false once none is left.
  bool run_one(uint64_t gen, int thread_index);

  int n_threads_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t, int)>* job_ = nullptr;
  // One word, so that a claim is checked against the job it belongs to:
  // [generation: 20 bits | n_tasks: 22 bits | next task: 22 bits]
  std::atomic<uint64_t> state_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> sleepers_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
};

}  // namespace alpaca
