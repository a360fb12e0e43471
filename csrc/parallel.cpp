// The CPU kernels' thread pool (see parallel.h for why it is not OpenMP's).
#include "parallel.h"

#include <condition_variable>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LOCDIFF_PAUSE() _mm_pause()
#else
#define LOCDIFF_PAUSE() ((void)0)
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace locdiff {

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

namespace {

// Iterations a waiting thread polls before it sleeps (~10-30 us): long enough to catch the next call
// of a loop of kernel calls, short enough not to matter to another process that needs the core.
constexpr int kSpin = 2000;

thread_local bool in_region = false;

class Pool {
 public:
  void run(int threads, const std::function<void()>& region) {
    bool expected = false;
    if (threads <= 1 || in_region || !busy_.compare_exchange_strong(expected, true)) {
      region();
      return;
    }
    struct Release {
      std::atomic<bool>& b;
      ~Release() { b.store(false); }
    } release{busy_};
    const int helpers = threads - 1;
    grow(helpers);
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &region;
      wanted_ = helpers;
      taken_ = 0;
      error_ = nullptr;
      remaining_.store(helpers);
      generation_.store(generation_.load() + 1);
    }
    work_.notify_all();
    in_region = true;
    std::exception_ptr mine;
    try {
      region();
    } catch (...) {
      mine = std::current_exception();
    }
    in_region = false;
    {  // helpers that have not woken yet are not waited for: the work is done
      std::lock_guard<std::mutex> lock(mu_);
      remaining_.fetch_sub(wanted_ - taken_);
      wanted_ = taken_;
    }
    for (int i = 0; i < kSpin && remaining_.load(std::memory_order_acquire) > 0; ++i) LOCDIFF_PAUSE();
    if (remaining_.load(std::memory_order_acquire) > 0) {
      std::unique_lock<std::mutex> lock(mu_);
      done_.wait(lock, [&] { return remaining_.load() == 0; });
    }
    if (mine) std::rethrow_exception(mine);
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void grow(int helpers) {
    while (workers_ < helpers) {
      // The job about to be posted is the first a new worker takes: it starts from the generation
      // before it (reading the counter on its own could miss a job posted before it ran).
      const uint64_t seen = generation_.load();
      std::thread([this, seen] { work(seen); }).detach();  // lives as long as the process
      ++workers_;
    }
  }

  void work(uint64_t seen) {
    in_region = true;  // a kernel called from inside a region runs on its own thread
    for (;;) {
      for (int i = 0; i < kSpin && generation_.load(std::memory_order_acquire) == seen; ++i) LOCDIFF_PAUSE();
      const std::function<void()>* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mu_);
        work_.wait(lock, [&] { return generation_.load() != seen; });
        seen = generation_.load();
        if (taken_ < wanted_) {
          ++taken_;
          job = job_;
        }
      }
      if (!job) continue;
      try {
        (*job)();
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        if (!error_) error_ = std::current_exception();
      }
      if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mu_);
        done_.notify_all();
      }
    }
  }

  std::mutex mu_;
  std::condition_variable work_, done_;
  const std::function<void()>* job_ = nullptr;
  int wanted_ = 0, taken_ = 0, workers_ = 0;
  std::exception_ptr error_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> remaining_{0};
  std::atomic<bool> busy_{false};
};

// Never destroyed: its detached workers may still be waiting when the process exits.  A child
// made by fork() (a DataLoader worker) has none of the parent's threads, so it starts a new pool.
Pool* pool_instance(bool reset = false) {
  static Pool* pool = new Pool();
  if (reset) pool = new Pool();
  return pool;
}

#if defined(__unix__) || defined(__APPLE__)
struct ForkHandler {
  ForkHandler() {
    pthread_atfork(nullptr, nullptr, [] { pool_instance(true); });
  }
} fork_handler;
#endif

}  // namespace

void parallel_region(const std::function<void()>& region) { pool_instance()->run(max_threads(), region); }

}  // namespace locdiff
