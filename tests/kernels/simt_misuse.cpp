// Kernels that misuse CUDA, for the emulation's own tests (tests/kernels/test_simt.py): each case must fail
// its launch with a message, as on a GPU (bad configurations) or where a GPU would give undefined results
// (shuffles and barriers that not every thread reaches, shared memory past its size).  "reduce" is the
// correct kernel beside them.
#include <cstdio>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>

#include "cuda_launch.h"

namespace {

__global__ void reduce_kernel(const double* in, double* out, int n) {
  __shared__ double partial[32];
  double v = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) v += in[i];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) s += partial[w];
    out[blockIdx.x] = s;
  }
}

__global__ void uses_shared(int bytes, int write_at) {
  LOCDIFF_DYNAMIC_SHARED(unsigned char, smem, (size_t)bytes);
  if (threadIdx.x == 0) smem[write_at] = 1;
}

__global__ void lane_returns_before_shuffle(double* out) {
  if (threadIdx.x % 32 == 31) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (double)threadIdx.x, 1);
}

__global__ void lanes_at_two_shuffles(double* out) {
  double v = threadIdx.x;
  if (threadIdx.x % 2) v = __shfl_down_sync(0xffffffffu, v, 1);
  else v = __shfl_down_sync(0xffffffffu, v, 2);
  out[threadIdx.x] = v;
}

__global__ void shuffle_at_divergent_barrier(double* out) {
  double v = threadIdx.x;
  if (threadIdx.x == 0) __syncthreads();
  else v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

void expect(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // as sh_cuda.cu's check(): the failed call's error is the last error too
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
  }
}

void run(const std::string& c) {
  double buf[1024] = {0};
  if (c == "reduce") {
    double in[1000], out[3];
    for (int i = 0; i < 1000; ++i) in[i] = i;
    locdiff::launch(reduce_kernel, locdiff::grid_1d(3), 128, 0, nullptr, in, out, 1000);
    expect(cudaGetLastError(), "reduce");
    for (double o : out)
      if (o != 499500.0) throw std::runtime_error("reduce: wrong sum " + std::to_string(o));
  } else if (c == "shared_too_small") {  // the kernel uses 1024 bytes, the launch gives 512
    locdiff::launch(uses_shared, locdiff::grid_1d(1), 64, 512, nullptr, 1024, 0);
  } else if (c == "shared_overrun") {  // the kernel says 512 bytes and writes byte 512
    locdiff::launch(uses_shared, locdiff::grid_1d(1), 64, 512, nullptr, 512, 512);
  } else if (c == "shared_above_limit") {  // 64 KB without cudaFuncSetAttribute
    locdiff::launch(uses_shared, locdiff::grid_1d(1), 64, 65536, nullptr, 16, 0);
  } else if (c == "shared_attribute_too_large") {
    expect(cudaFuncSetAttribute(uses_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 300000), "attribute");
  } else if (c == "block_too_large") {
    locdiff::launch(reduce_kernel, locdiff::grid_1d(1), 2048, 0, nullptr, buf, buf, 0);
  } else if (c == "grid_too_large") {
    locdiff::launch(reduce_kernel, locdiff::grid_1d(int64_t(1) << 32), 32, 0, nullptr, buf, buf, 0);
  } else if (c == "lane_returns_before_shuffle") {
    locdiff::launch(lane_returns_before_shuffle, locdiff::grid_1d(1), 64, 0, nullptr, buf);
  } else if (c == "lanes_at_two_shuffles") {
    locdiff::launch(lanes_at_two_shuffles, locdiff::grid_1d(1), 32, 0, nullptr, buf);
  } else if (c == "shuffle_at_divergent_barrier") {
    const double keep = locdiff_simt::deadlock_seconds;
    locdiff_simt::deadlock_seconds = 0.5;
    locdiff::launch(shuffle_at_divergent_barrier, locdiff::grid_1d(1), 32, 0, nullptr, buf);
    locdiff_simt::deadlock_seconds = keep;
  } else {
    throw std::invalid_argument("no misuse case " + c);
  }
  expect(cudaGetLastError(), c.c_str());
}

}  // namespace

extern "C" int locdiff_simt_misuse(const char* which, char* err, size_t errlen) {
  try {
    run(which);
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, errlen, "%s", e.what());
  }
  return 1;
}
