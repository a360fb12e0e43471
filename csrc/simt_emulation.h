// A host build of the CUDA kernels (test-only): compiled with LOCDIFF_SIMT_EMULATION, sh_cuda.cu runs on the
// CPU with one OS thread per CUDA thread, so that CI without a GPU executes the kernels' own source, its
// barriers, shuffles and shared memory included, and ThreadSanitizer / AddressSanitizer can watch it.
//
// What is emulated, and how:
// - __global__ / __device__ / __host__ / __forceinline__ are defined away; threadIdx, blockIdx, blockDim and
//   gridDim are thread-local values set for each emulated thread.
// - launch() (the one launch helper sh_cuda.cu uses; kernel<<<...>>> under nvcc) checks the configuration like
//   a GPU (H100 limits), then runs the grid's blocks one after another, each with blockDim threads of a
//   reusable pool.  Launches are synchronous and one at a time (a process-wide lock), so a function-local
//   `static` is a block's __shared__ array.
// - __syncthreads() is a block barrier; threads that returned count as arrived (as on Volta and later).
// - __shfl_*_sync exchange values through a per-warp buffer at a warp barrier.  Every lane named in the mask
//   must take part, at the same call site with the same mask and kind, and no lane outside the mask may:
//   anything else is a launch failure with a message that names the lanes.  A shuffle or barrier that waits
//   more than deadlock_seconds (20 s) (lanes at different barriers) fails the launch too.
// - Dynamic shared memory (LOCDIFF_DYNAMIC_SHARED) is a fresh buffer per block, filled with 0xFF bytes (NaN
//   in float and double) so that reading what no thread wrote shows; without AddressSanitizer a guard zone
//   behind it is checked after each block (a write past the launch's size is a launch failure), with it the
//   buffer has the launch's exact size.  The kernel states the bytes it uses, checked against the launch's.
// - cudaMalloc / cudaMemcpy / streams / events are host memory and no-ops; errors are reported the CUDA way
//   (cudaGetLastError, cudaGetErrorString), so sh_cuda.cu's own checks turn them into exceptions.
// - Math intrinsics (sincos, sincosf, expf, rint, ...) are libm's: only a GPU shows the device's rounding.
#pragma once

#ifndef LOCDIFF_SIMT_EMULATION
#error "simt_emulation.h is the host build of the CUDA kernels: compile with -DLOCDIFF_SIMT_EMULATION"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Blocks run one at a time, so a function-local static is the block's shared memory.
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct CUstream_st;
struct CUevent_st;
using cudaStream_t = CUstream_st*;
using cudaEvent_t = CUevent_st*;

namespace locdiff_simt {

constexpr int kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kDefaultDynamicShared = 48 * 1024;  // without cudaFuncSetAttribute
constexpr size_t kMaxDynamicShared = 232448;         // H100's opt-in maximum per block (227 KB)
// A thread that waits longer than this at a barrier or shuffle fails its launch (a deadlock).
extern double deadlock_seconds;

// Error bookkeeping (the CUDA runtime's last error of the calling host thread).
cudaError_t set_error(cudaError_t err, const char* message);
cudaError_t take_error();
const char* error_string(cudaError_t err);

// Kernel-side operations of the current emulated thread.
void sync_block();
void exchange(uint32_t mask, void* value, size_t bytes, int src_lane, int kind, const char* file, int line);
void* dynamic_shared(size_t bytes);

// Launch helpers (implemented in simt_emulation.cpp).
size_t& function_shared_limit(const void* kernel);
struct BlockBody {
  virtual void run() = 0;
  virtual ~BlockBody() = default;
};
cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, BlockBody& body);

template <typename F>
struct BlockBodyOf : BlockBody {
  F f;
  explicit BlockBodyOf(F&& f_) : f(std::move(f_)) {}
  void run() override { f(); }
};

enum ShuffleKind { kShflDown = 1, kShflUp = 2, kShflXor = 3, kShflIdx = 4 };

template <typename T>
T shuffle(uint32_t mask, T v, int kind, int arg, int width, const char* file, int line) {
  const int lane = (int)(threadIdx.x % kWarpSize);
  const int base = lane - lane % width;  // the lane's segment of `width` lanes
  int src = lane;
  if (kind == kShflDown) src = lane % width + arg < width ? lane + arg : lane;
  else if (kind == kShflUp) src = lane % width - arg >= 0 ? lane - arg : lane;
  else if (kind == kShflXor) src = ((lane % width) ^ arg) < width ? base + ((lane % width) ^ arg) : lane;
  else src = base + ((arg % width) + width) % width;
  T out = v;
  exchange(mask, &out, sizeof(T), src, kind, file, line);
  return out;
}

}  // namespace locdiff_simt

inline void __syncthreads() { locdiff_simt::sync_block(); }

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  return locdiff_simt::shuffle(mask, v, locdiff_simt::kShflDown, (int)delta, width, file, line);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  return locdiff_simt::shuffle(mask, v, locdiff_simt::kShflUp, (int)delta, width, file, line);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  return locdiff_simt::shuffle(mask, v, locdiff_simt::kShflXor, lane_mask, width, file, line);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  return locdiff_simt::shuffle(mask, v, locdiff_simt::kShflIdx, src_lane, width, file, line);
}

// Dynamic shared memory: the kernel names the bytes it uses, which must fit the launch's argument.
#define LOCDIFF_DYNAMIC_SHARED(type, name, bytes) \
  type* name = static_cast<type*>(::locdiff_simt::dynamic_shared(bytes))

// The CUDA runtime calls sh_cuda.cu makes, on host memory.
template <typename T>
cudaError_t cudaMalloc(T** ptr, size_t bytes) {
  *ptr = static_cast<T*>(::operator new(bytes ? bytes : 1, std::nothrow));
  return *ptr ? cudaSuccess : locdiff_simt::set_error(cudaErrorMemoryAllocation, "out of memory");
}
inline cudaError_t cudaFree(void* ptr) {
  ::operator delete(ptr);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  if (bytes) std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, kind);
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = nullptr;
  return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = nullptr;
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t = nullptr) { return cudaSuccess; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  return d == 0 ? cudaSuccess : locdiff_simt::set_error(cudaErrorInvalidValue, "invalid device ordinal");
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return locdiff_simt::take_error(); }
inline const char* cudaGetErrorString(cudaError_t err) { return locdiff_simt::error_string(err); }

template <typename K>
cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || (size_t)value > locdiff_simt::kMaxDynamicShared)
    return locdiff_simt::set_error(cudaErrorInvalidValue, "invalid argument (dynamic shared memory above the device's "
                                                          "227 KB per block)");
  locdiff_simt::function_shared_limit((const void*)kernel) = (size_t)value;
  return cudaSuccess;
}

namespace locdiff {
// kernel<<<grid, block, smem, stream>>>(args...) under nvcc; here the grid runs on the pool, synchronously.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args&&... args) {
  auto body = [&]() { kernel(args...); };
  locdiff_simt::BlockBodyOf<decltype(body)> b(std::move(body));
  locdiff_simt::run_grid((const void*)kernel, grid, block, smem, b);
}
}  // namespace locdiff
