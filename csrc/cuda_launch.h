// What sh_cuda.cu needs of the CUDA runtime: nvcc's, or the host emulation's (simt_emulation.h, test-only).
// Under nvcc, launch() is kernel<<<grid, block, smem, stream>>>(args...) and LOCDIFF_DYNAMIC_SHARED declares
// the extern __shared__ array; emulated, both are checked (simt_emulation.h).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#ifdef LOCDIFF_SIMT_EMULATION
#include "simt_emulation.h"
#else
#include <cuda_runtime.h>

#define LOCDIFF_DYNAMIC_SHARED(type, name, bytes) \
  extern __shared__ type name[];                  \
  (void)(bytes)

namespace locdiff {
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
}
}  // namespace locdiff
#endif

namespace locdiff {
// A 1-D grid of `blocks` blocks: more than a GPU's 2^31 - 1 is an error, not a count cut to 32 bits.
inline dim3 grid_1d(int64_t blocks) {
  if (blocks < 1 || blocks > 2147483647LL)
    throw std::invalid_argument("CUDA launch: a grid of " + std::to_string(blocks) +
                                " blocks (a GPU runs 1 to 2^31 - 1): split the batch");
  return dim3((unsigned)blocks);
}
}  // namespace locdiff
