// The emulated CUDA runtime behind simt_emulation.h (test-only): a pool of host threads runs each block,
// block barriers and warp shuffles with their misuse checks, dynamic shared memory with a guard zone, and
// the CUDA-style last error.  One launch at a time.
#include "simt_emulation.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace locdiff_simt {

double deadlock_seconds = 20.0;

namespace {

thread_local cudaError_t last_error = cudaSuccess;
thread_local std::string last_message;

#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kGuard = 0;  // AddressSanitizer watches the exact-size buffer itself
#else
constexpr size_t kGuard = 4096;
#endif
constexpr unsigned char kGuardByte = 0xA5;

struct Abort {};

const char* base_name(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}  // unwinds an emulated thread after its block failed

std::string hex(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

struct Warp {
  std::mutex mu;
  std::condition_variable cv;
  uint32_t alive = 0, arrived = 0, mask = 0;
  int kind = 0, line = 0;
  const char* file = "";
  size_t bytes = 0;
  uint64_t gen = 0;
  unsigned char in[kWarpSize][8], out[kWarpSize][8];
  int src[kWarpSize];
};

struct Block {
  std::mutex mu;
  std::condition_variable cv;
  int alive = 0, arrived = 0;
  uint64_t gen = 0;
  std::vector<std::unique_ptr<Warp>> warps;
  std::atomic<bool> failed{false};
  std::mutex error_mu;
  std::string error;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;

  void fail(const std::string& why) {
    {
      std::lock_guard<std::mutex> lock(error_mu);
      if (error.empty()) error = why;
    }
    failed.store(true);
    { std::lock_guard<std::mutex> lock(mu); }
    cv.notify_all();
    for (auto& w : warps) {
      { std::lock_guard<std::mutex> lock(w->mu); }
      w->cv.notify_all();
    }
  }
};

thread_local Block* current = nullptr;

std::string where() {
  return "thread " + std::to_string(threadIdx.x) + " of block " + std::to_string(blockIdx.x);
}

[[noreturn]] void fail_here(const std::string& why) {
  current->fail(why);
  throw Abort{};
}

// Waits on cv (holding lock) until done() or the block failed; a wait past kDeadlockSeconds is a deadlock.
template <typename Done>
void wait_or_fail(std::unique_lock<std::mutex>& lock, std::condition_variable& cv, Done done, const char* at) {
  const auto limit = std::chrono::steady_clock::now() + std::chrono::duration<double>(deadlock_seconds);
  while (!done()) {
    if (current->failed.load()) throw Abort{};
    if (cv.wait_until(lock, limit) == std::cv_status::timeout && !done()) {
      lock.unlock();
      fail_here(std::string("deadlock: ") + where() + " waited " + std::to_string(deadlock_seconds) +
                " s at " + at + " (threads of the block wait at different barriers or shuffles)");
    }
  }
}

// The thread's last act in a block: it counts as arrived at later barriers, and lanes that wait for it
// at a shuffle fail.
void leave() {
  Block& b = *current;
  {
    std::lock_guard<std::mutex> lock(b.mu);
    --b.alive;
    if (b.arrived > 0 && b.arrived == b.alive) {
      b.arrived = 0;
      ++b.gen;
      b.cv.notify_all();
    }
  }
  Warp& w = *b.warps[threadIdx.x / kWarpSize];
  const uint32_t bit = 1u << (threadIdx.x % kWarpSize);
  std::unique_lock<std::mutex> lock(w.mu);
  w.alive &= ~bit;
  if (w.arrived && (w.mask & bit)) {
    const int line = w.line;
    const char* file = w.file;
    lock.unlock();
    b.fail(std::string("shuffle at ") + base_name(file) + ":" + std::to_string(line) + ": lane " + std::to_string(threadIdx.x % kWarpSize) +
           " of warp " + std::to_string(threadIdx.x / kWarpSize) + " (block " + std::to_string(blockIdx.x) +
           ") returned while lanes " + hex(w.arrived) + " wait for it (mask " + hex(w.mask) + ")");
  }
}

struct Pool {
  std::mutex mu;
  std::condition_variable start, done;
  uint64_t generation = 0;
  unsigned nthreads = 0, finished = 0;
  BlockBody* body = nullptr;
  Block* block = nullptr;
  dim3 grid, bdim, bidx;
  unsigned size = 0;

  void grow(unsigned n) {
    for (; size < n; ++size) std::thread([this, i = size] { work(i); }).detach();
  }

  void work(unsigned i) {
    uint64_t seen = 0;
    for (;;) {
      BlockBody* f;
      {
        std::unique_lock<std::mutex> lock(mu);
        start.wait(lock, [&] { return generation != seen; });
        seen = generation;
        if (i >= nthreads) continue;
        f = body;
        current = block;
        gridDim = grid;
        blockDim = bdim;
        blockIdx = bidx;
      }
      threadIdx = dim3(i % bdim.x, (i / bdim.x) % bdim.y, i / (bdim.x * bdim.y));
      try {
        f->run();
      } catch (const Abort&) {
      } catch (const std::exception& e) {
        current->fail(where() + " threw: " + e.what());
      } catch (...) {
        current->fail(where() + " threw an unknown exception");
      }
      leave();
      current = nullptr;
      std::lock_guard<std::mutex> lock(mu);
      if (++finished == nthreads) done.notify_all();
    }
  }

  // Runs one block with n threads and waits for all of them.
  void run_block(BlockBody& f, Block& b, dim3 g, dim3 bd, dim3 bi) {
    const unsigned n = bd.x * bd.y * bd.z;
    grow(n);
    std::unique_lock<std::mutex> lock(mu);
    body = &f;
    block = &b;
    grid = g;
    bdim = bd;
    bidx = bi;
    nthreads = n;
    finished = 0;
    ++generation;
    start.notify_all();
    done.wait(lock, [&] { return finished == nthreads; });
  }
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: its detached threads outlive static destructors
  return *p;
}

std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

}  // namespace

cudaError_t set_error(cudaError_t err, const char* message) {
  last_error = err;
  last_message = message;
  return err;
}

cudaError_t take_error() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

const char* error_string(cudaError_t err) {
  if (err == cudaSuccess) return "no error";
  return last_message.empty() ? "unknown error" : last_message.c_str();
}

size_t& function_shared_limit(const void* kernel) {
  static std::map<const void*, size_t> limits;
  auto it = limits.find(kernel);
  if (it == limits.end()) it = limits.emplace(kernel, kDefaultDynamicShared).first;
  return it->second;
}

void sync_block() {
  Block& b = *current;
  std::unique_lock<std::mutex> lock(b.mu);
  if (++b.arrived == b.alive) {
    b.arrived = 0;
    ++b.gen;
    b.cv.notify_all();
    return;
  }
  const uint64_t gen = b.gen;
  wait_or_fail(lock, b.cv, [&] { return b.gen != gen; }, "__syncthreads()");
}

void exchange(uint32_t mask, void* value, size_t bytes, int src_lane, int kind, const char* file, int line) {
  Block& b = *current;
  const int lane = (int)(threadIdx.x % kWarpSize), warp = (int)(threadIdx.x / kWarpSize);
  const uint32_t bit = 1u << lane;
  Warp& w = *b.warps[warp];
  const std::string at = std::string("shuffle at ") + base_name(file) + ":" + std::to_string(line) + ", warp " + std::to_string(warp) +
                         " of block " + std::to_string(blockIdx.x);
  std::unique_lock<std::mutex> lock(w.mu);
  std::string why;
  if (!(mask & bit))
    why = at + ": lane " + std::to_string(lane) + " takes part but its mask " + hex(mask) + " does not name it";
  else if (mask & ~w.alive)
    why = at + ": mask " + hex(mask) + " names lanes " + hex(mask & ~w.alive) + " that have returned";
  else if (w.arrived && (w.mask != mask || w.kind != kind || w.line != line || w.bytes != bytes))
    why = at + ": lane " + std::to_string(lane) + " (line " + std::to_string(line) + ", mask " + hex(mask) +
          ") meets lanes " + hex(w.arrived) + " at another shuffle (line " + std::to_string(w.line) + ", mask " +
          hex(w.mask) + ")";
  else if (!(mask & (1u << src_lane)))
    why = at + ": lane " + std::to_string(lane) + " reads lane " + std::to_string(src_lane) +
          ", which the mask " + hex(mask) + " does not name";
  if (!why.empty()) {
    lock.unlock();
    fail_here(why);
  }
  if (!w.arrived) {
    w.mask = mask;
    w.kind = kind;
    w.line = line;
    w.file = file;
    w.bytes = bytes;
  }
  std::memcpy(w.in[lane], value, bytes);
  w.src[lane] = src_lane;
  w.arrived |= bit;
  if (w.arrived == mask) {  // the last lane: every lane's result, then release the warp
    for (int l = 0; l < kWarpSize; ++l)
      if (mask & (1u << l)) std::memcpy(w.out[l], w.in[w.src[l]], bytes);
    w.arrived = 0;
    ++w.gen;
    w.cv.notify_all();
  } else {
    const uint64_t gen = w.gen;
    wait_or_fail(lock, w.cv, [&] { return w.gen != gen; }, at.c_str());
  }
  std::memcpy(value, w.out[lane], bytes);
}

void* dynamic_shared(size_t bytes) {
  Block& b = *current;
  if (bytes > b.smem_bytes)
    fail_here("block " + std::to_string(blockIdx.x) + " uses " + std::to_string(bytes) +
              " bytes of dynamic shared memory but the launch gave " + std::to_string(b.smem_bytes));
  return b.smem;
}

cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, BlockBody& body) {
  const uint64_t threads = (uint64_t)block.x * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.x > 1024 || block.y > 1024 || block.z > 64)
    return set_error(cudaErrorInvalidConfiguration,
                     ("invalid configuration argument: a block of " + std::to_string(block.x) + " x " +
                      std::to_string(block.y) + " x " + std::to_string(block.z) + " threads (at most 1024)")
                         .c_str());
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    return set_error(cudaErrorInvalidConfiguration,
                     ("invalid configuration argument: a grid of " + std::to_string(grid.x) + " x " +
                      std::to_string(grid.y) + " x " + std::to_string(grid.z) + " blocks")
                         .c_str());
  std::lock_guard<std::mutex> launch_lock(launch_mutex());
  const size_t limit = function_shared_limit(kernel);
  if (smem > limit)
    return set_error(cudaErrorInvalidValue,
                     ("invalid argument: " + std::to_string(smem) + " bytes of dynamic shared memory requested, " +
                      std::to_string(limit) + " allowed for this kernel (cudaFuncSetAttribute raises it up to " +
                      std::to_string(kMaxDynamicShared) + ")")
                         .c_str());
  std::vector<unsigned char> smem_buf(smem + kGuard);
  Block b;
  const unsigned nwarps = (unsigned)((threads + kWarpSize - 1) / kWarpSize);
  for (unsigned w = 0; w < nwarps; ++w) b.warps.emplace_back(new Warp());
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::fill(smem_buf.begin(), smem_buf.begin() + smem, (unsigned char)0xFF);  // NaN in float / double
        std::fill(smem_buf.begin() + smem, smem_buf.end(), kGuardByte);
        b.smem = smem ? smem_buf.data() : nullptr;
        b.smem_bytes = smem;
        b.alive = (int)threads;
        b.arrived = 0;
        for (unsigned w = 0; w < nwarps; ++w) {
          const unsigned lanes = std::min<uint64_t>(kWarpSize, threads - (uint64_t)w * kWarpSize);
          b.warps[w]->alive = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
          b.warps[w]->arrived = 0;
        }
        pool().run_block(body, b, grid, block, dim3(x, y, z));
        std::string why;
        if (b.failed.load()) {
          std::lock_guard<std::mutex> lock(b.error_mu);
          why = b.error;
        } else if (std::any_of(smem_buf.begin() + smem, smem_buf.end(), [](unsigned char c) { return c != kGuardByte; })) {
          why = "block " + std::to_string(x) + " wrote past the " + std::to_string(smem) +
                " bytes of dynamic shared memory its launch gave";
        }
        if (!why.empty()) return set_error(cudaErrorLaunchFailure, ("unspecified launch failure: " + why).c_str());
      }
  return cudaSuccess;
}

}  // namespace locdiff_simt
