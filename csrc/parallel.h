// Exceptions and OpenMP: an exception that leaves a parallel region makes the OpenMP runtime call
// std::terminate, which aborts the Python interpreter.  Each region of the CPU kernels therefore runs
// its throwing parts (allocations of per-thread buffers, per-row work) through RegionErrors::guard:
// the first exception is kept, every later guarded call is skipped (threads still reach the
// worksharing barriers, so nothing hangs), and the calling thread rethrows it after the region,
// where pybind11 turns it into a Python exception (std::bad_alloc -> MemoryError).
#pragma once

#include <atomic>
#include <exception>
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

}  // namespace locdiff
