// What the two decode kernels of nf4_linear (M <= 16) share: their arguments and the end of a strip
// (the partial sums of the block's warps meet in shared memory; bias and the LoRA term are added
// in fp32 and the output rounded once).
//   nf4_gemv.cu               any K % 32 == 0 and blocksize >= 32 (scales applied per element)
//   nf4_gemv_blockaligned.cu  K % blocksize == 0, K % 128 == 0, blocksize >= 64 (scales applied per mma)
#pragma once
#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/nf4_decode.cuh"

namespace lora_fused {
namespace cuda {

struct GemvArgs {
  const void* x;  // [m, k], row stride k, 16-byte aligned
  const uint8_t* packed;
  BlockScales scales;
  int bs_shift;
  int m;
  int64_t n, k;
  const void* bias;    // [n] or nullptr
  const void* lora_u;  // [m, r] or nullptr
  const void* lora_B;  // [n, r]
  int r;
  void* out;  // [m, n]
};

constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = 32 * kGemvWarps;

// Streaming 16-byte load: the weight is read once, keep it out of L1.
__device__ __forceinline__ uint4 load_stream(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Shared memory for the strip's reduction: [kGemvWarps][16 R][8 NT + 1] floats.
template <int R, int NT>
constexpr size_t gemv_reduction_bytes() {
  return sizeof(float) * kGemvWarps * 16 * R * (8 * NT + 1);
}

// acc[i][j]: this lane's mma accumulators for rows 16i + g (q = 0, 1) and 16i + g + 8 (q = 2, 3),
// tokens 8j + 2t + (q & 1). Sums them over the block's warps and writes out[tok][nbase + row].
// Every thread of the block calls it once per strip.
template <typename T, int R, int NT>
__device__ __forceinline__ void gemv_finish_strip(const GemvArgs& a, float* red, const float (&acc)[R][NT][4],
                                                  int64_t nbase) {
  constexpr int kRows = 16 * R, kCols = 8 * NT, kStride = kCols + 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int row = 16 * i + g + 8 * (q >> 1), col = 8 * j + 2 * t + (q & 1);
        red[(warp * kRows + row) * kStride + col] = acc[i][j][q];
      }
  __syncthreads();
  const T* bias = static_cast<const T*>(a.bias);
  const T* u = static_cast<const T*>(a.lora_u);
  const T* lb = static_cast<const T*>(a.lora_B);
  T* out = static_cast<T*>(a.out);
  for (int idx = threadIdx.x; idx < kRows * kCols; idx += kGemvThreads) {
    const int row = idx % kRows, tok = idx / kRows;  // consecutive threads: consecutive outputs of a token
    const int64_t gn = nbase + row;
    if (gn >= a.n || tok >= a.m) continue;
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kGemvWarps; ++w) v += red[(w * kRows + row) * kStride + tok];
    if (bias != nullptr) v += static_cast<float>(bias[gn]);
    if (u != nullptr) {
      float l = 0.0f;
      for (int q = 0; q < a.r; ++q)
        l = fma_acc(static_cast<float>(u[tok * a.r + q]), static_cast<float>(lb[gn * a.r + q]), l);
      v += l;
    }
    out[tok * a.n + gn] = static_cast<T>(v);
  }
  __syncthreads();  // red is reused by the next strip
}

// The block-aligned kernel takes the shapes where every quantization block starts a 64-column group
// of its row (K % blocksize == 0, blocksize >= 64) and rows are whole 128-column windows
// (K % 128 == 0), with a power-of-two nested blocksize and scales aligned for paired loads.
inline bool nf4_gemv_blockaligned_takes(const GemvArgs& a) {
  const bool aligned = a.scales.absmax != nullptr ? reinterpret_cast<uintptr_t>(a.scales.absmax) % 8 == 0
                                                  : reinterpret_cast<uintptr_t>(a.scales.codes) % 2 == 0;
  return a.bs_shift >= 6 && a.k % 128 == 0 && a.k % (int64_t{1} << a.bs_shift) == 0 && aligned &&
         (a.scales.absmax != nullptr || a.scales.nested_shift >= 1);
}
void nf4_gemv_blockaligned_launch(const GemvArgs& a, at::ScalarType dtype, cudaStream_t stream, int sms);

}  // namespace cuda
}  // namespace lora_fused
