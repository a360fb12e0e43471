// Parallel regions of the CPU kernels: the library's own thread pool, and errors inside regions.
//
// Why not OpenMP's parallel regions: the OpenMP runtime is shared with torch (one libgomp per
// process), and its threads spin-wait at every barrier for a long while (GOMP_SPINCOUNT) unless the
// user sets OMP_WAIT_POLICY=passive before torch loads it, which a library cannot do.  With another
// process busy on the cores (a DataLoader, a second job) the spinners hold the cores the thread that
// still has work needs: our calls slowed 3x under such a load against 1.7x with a passive policy
// (BENCHMARKS.md 1e).  The pool's workers spin only briefly for the next job and otherwise sleep;
// the calling thread takes part, and loops hand out chunks dynamically.
//
// Exceptions: each region runs its throwing parts (allocations of per-thread buffers, per-row work)
// through RegionErrors::guard: the first exception is kept, every later guarded call is skipped, and
// the calling thread rethrows it after the region, where pybind11 turns it into a Python exception
// (std::bad_alloc -> MemoryError).  An exception that escapes a region anyway is rethrown likewise.
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <utility>

namespace locdiff {

class RegionErrors {
 public:
  template <typename F>
  void guard(F&& f) noexcept {
    if (failed()) return;
    try {
      std::forward<F>(f)();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!err_) err_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
    }
  }
  bool failed() const { return failed_.load(std::memory_order_relaxed); }
  void rethrow() const {
    if (err_) std::rethrow_exception(err_);
  }

 private:
  std::atomic<bool> failed_{false};
  std::mutex mu_;
  std::exception_ptr err_;
};

// Threads the CPU kernels use: OpenMP's setting (torch.set_num_threads sets it), else 1.
int max_threads();

// Runs region() on max_threads() threads at once (the caller is one of them) and returns when every
// one has finished.  A call made while the pool is busy (another Python thread, or from inside a
// region) runs region() on the calling thread alone: same results, no waiting on each other.
void parallel_region(const std::function<void()>& region);

// Iterations 0..n-1 handed out in chunks to whichever thread asks next (dynamic scheduling); every
// thread of a region calls run() on the same loop object.
class DynamicLoop {
 public:
  DynamicLoop(int64_t n, int64_t chunk) : n_(n), chunk_(chunk < 1 ? 1 : chunk) {}
  template <typename F>
  void run(F&& body) {
    for (;;) {
      const int64_t begin = next_.fetch_add(chunk_, std::memory_order_relaxed);
      if (begin >= n_) return;
      const int64_t end = begin + chunk_ < n_ ? begin + chunk_ : n_;
      for (int64_t i = begin; i < end; ++i) body(i);
    }
  }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t n_, chunk_;
};

}  // namespace locdiff
