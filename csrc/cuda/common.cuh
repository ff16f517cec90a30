// Helpers shared by the CUDA kernels: launch plumbing and explicit fused multiply-adds (the build
// uses --fmad=false so NF4 decoding rounds like bitsandbytes; matmul loops ask for FMA by name).
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <atomic>
#include <cstdint>

namespace lora_fused {
namespace cuda {

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// A 16-byte read-only load that the compiler keeps in program order with the other volatile asm
// (loads, mma): written all before the arithmetic that uses them, the loads stay in flight together
// instead of being interleaved with it a few at a time.
__device__ __forceinline__ uint4 load_nc16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Grids are at most 2^31-1 blocks in x; every launcher here stays far below that for tensors
// that fit in memory, but say so rather than launch a truncated grid.
inline unsigned int grid_x(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks <= 0x7fffffffLL, op, ": the problem needs ", blocks, " thread blocks, more than a CUDA grid holds");
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks);
}

// More than 48 KiB of dynamic shared memory needs an opt-in per kernel, once per device.
template <auto Kernel>
void opt_in_dynamic_smem(size_t bytes) {
  static std::atomic<uint64_t> opted_in{0};
  const int dev = at::cuda::current_device();
  const uint64_t bit = uint64_t{1} << (dev % 64);
  if ((opted_in.load() & bit) == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    opted_in.fetch_or(bit);
  }
}

// Blocks of Kernel that fit on one SM at once with `threads` threads and `smem` bytes of dynamic
// shared memory, asked once per process: each caller passes the same threads and smem for a kernel.
template <auto Kernel>
int resident_blocks_per_sm(int threads, size_t smem) {
  static const int per_sm = [threads, smem] {
    int b = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, Kernel, threads, smem));
    return b < 1 ? 1 : b;
  }();
  return per_sm;
}

}  // namespace cuda
}  // namespace lora_fused
