// What the two decode kernels of nf4_linear (M <= 16) share: their arguments and the end of a strip
// (the partial sums of the block's warps meet in shared memory; bias and the LoRA term are added
// in fp32 and the output rounded once).
//   nf4_gemv.cu               any K % 32 == 0 and blocksize >= 32 (scales applied per element)
//   nf4_gemv_blockaligned.cu  blocksize 64, K % 256 == 0 (scales applied per mma)
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

// Shared memory for the strip's reduction: [kGemvWarps][16 R][8 NT + 1] floats.
template <int R, int NT>
constexpr size_t gemv_reduction_bytes() {
  return sizeof(float) * kGemvWarps * 16 * R * (8 * NT + 1);
}

// The barrier of the kGemvWarps warps that share a strip: bar_id 0 is the whole block of
// kGemvThreads (= __syncthreads); other ids serve teams of a bigger block.
__device__ __forceinline__ void gemv_team_barrier(int bar_id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(bar_id), "n"(kGemvThreads) : "memory");
}

// acc[i][j]: this lane's mma accumulators for rows 16i + g (q = 0, 1) and 16i + g + 8 (q = 2, 3),
// tokens 8j + 2t + (q & 1). Sums them over the team's kGemvWarps warps (tid: the thread's index in
// its team, bar_id: the team's barrier) and writes out[tok][nbase + row]. Every thread of the team
// calls it once per strip.
template <typename T, int R, int NT>
__device__ __forceinline__ void gemv_finish_strip(const GemvArgs& a, float* red, const float (&acc)[R][NT][4],
                                                  int64_t nbase, int tid, int bar_id) {
  constexpr int kRows = 16 * R, kCols = 8 * NT, kStride = kCols + 1;
  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int row = 16 * i + g + 8 * (q >> 1), col = 8 * j + 2 * t + (q & 1);
        red[(warp * kRows + row) * kStride + col] = acc[i][j][q];
      }
  gemv_team_barrier(bar_id);
  const T* bias = static_cast<const T*>(a.bias);
  const T* u = static_cast<const T*>(a.lora_u);
  const T* lb = static_cast<const T*>(a.lora_B);
  T* out = static_cast<T*>(a.out);
  for (int idx = tid; idx < kRows * kCols; idx += kGemvThreads) {
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
  gemv_team_barrier(bar_id);  // red is reused by the next strip
}

// The block-aligned kernel takes blocksize 64 (bitsandbytes' default) with rows of whole 256-column
// steps (K % 256 == 0, so a step's 4 blocks per row are one aligned 4-byte code word or 16 bytes of
// fp32 scales), a nested blocksize of at least 4 blocks (a power of two), aligned scale tensors and
// block indices below 2^31 (weights under 2^37 elements).
inline bool nf4_gemv_blockaligned_takes(const GemvArgs& a) {
  const bool nested = a.scales.absmax == nullptr;
  const bool aligned = nested ? reinterpret_cast<uintptr_t>(a.scales.codes) % 4 == 0
                              : reinterpret_cast<uintptr_t>(a.scales.absmax) % 16 == 0;
  return a.bs_shift == 6 && a.k % 256 == 0 && aligned && (!nested || a.scales.nested_shift >= 2) &&
         a.n * (a.k >> 6) < (int64_t{1} << 31);
}
void nf4_gemv_blockaligned_launch(const GemvArgs& a, at::ScalarType dtype, cudaStream_t stream, int sms);

}  // namespace cuda
}  // namespace lora_fused
