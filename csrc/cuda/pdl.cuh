// Programmatic dependent launch (sm_90+): a kernel launched with it may start while the kernel
// before it in the stream still runs, once that one has called pdl_launch_dependents(); it must
// call pdl_wait() before it reads what that kernel writes. Elsewhere both are no-ops and the launch
// is an ordinary one.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

namespace lora_fused {
namespace cuda {

// Waits for the grids this one depends on to complete, their writes visible.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Lets the next kernel in the stream (if launched with programmatic serialization) start now.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether to launch with it on a GPU of compute capability `major`: sm_90+, unless LORA_FUSED_PDL=0
// (for comparisons).
inline bool pdl_enabled(int major) {
  const char* env = std::getenv("LORA_FUSED_PDL");
  return major >= 9 && (env == nullptr || std::strcmp(env, "0") != 0);
}

// kernel<<<grid, block, smem, stream>>>(args...), allowed to overlap the previous kernel when pdl.
template <typename... KArgs, typename... Args>
void launch_maybe_pdl(bool pdl, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                      Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = pdl ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

}  // namespace cuda
}  // namespace lora_fused
