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
  // Or u computed by the (block-aligned) kernel: u32 [m, r] fp32 = lora_scale * x @ lora_A^T.
  const void* lora_A;  // [r, k] or nullptr
  float lora_scale;
  float* lora_u32;
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

// sum_q u[q] * b[q] in fp32, q ascending (u: T, or fp32 as the block-aligned kernel computes it);
// 16-byte loads where the rows allow (vec).
template <typename U, typename T>
__device__ __forceinline__ float lora_dot(const U* u, const T* b, int r, bool vec) {
  float l = 0.0f;
  if (vec) {
#pragma unroll 4
    for (int q = 0; q < r; q += 8) {
      U ue[8];
      if constexpr (sizeof(U) == 4) {
        *reinterpret_cast<float4*>(ue) = *reinterpret_cast<const float4*>(u + q);  // written by this kernel: no __ldg
        *reinterpret_cast<float4*>(ue + 4) = *reinterpret_cast<const float4*>(u + q + 4);
      } else {
        *reinterpret_cast<uint4*>(ue) = __ldg(reinterpret_cast<const uint4*>(u + q));
      }
      const uint4 bv = __ldg(reinterpret_cast<const uint4*>(b + q));
      const T* be = reinterpret_cast<const T*>(&bv);
#pragma unroll
      for (int e = 0; e < 8; ++e) l = fma_acc(static_cast<float>(ue[e]), static_cast<float>(be[e]), l);
    }
  } else {
    for (int q = 0; q < r; ++q) l = fma_acc(static_cast<float>(u[q]), static_cast<float>(b[q]), l);
  }
  return l;
}

// acc[i][j]: this lane's mma accumulators for rows 16i + g (q = 0, 1) and 16i + g + 8 (q = 2, 3),
// tokens 8j + 2t + (q & 1). Sums them over the team's kGemvWarps warps (tid: the thread's index in
// its team, bar_id: the team's barrier) and writes out[tok][nbase + row], + bias + the LoRA term.
// Every thread of the team calls it once per strip.
template <typename T, int R, int NT>
__device__ __forceinline__ void gemv_finish_strip(const GemvArgs& a, float* red, const float (&acc)[R][NT][4],
                                                  int64_t nbase, int tid, int bar_id) {
  constexpr int kRows = 16 * R, kCols = 8 * NT, kStride = kCols + 1;
  constexpr int kPer = (kRows * kCols + kGemvThreads - 1) / kGemvThreads;  // outputs per thread
  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const T* bias = static_cast<const T*>(a.bias);
  const T* u = static_cast<const T*>(a.lora_u);
  const T* lb = static_cast<const T*>(a.lora_B);
  T* out = static_cast<T*>(a.out);
  // Bias and LoRA term of this thread's outputs before the barrier: their loads overlap the wait
  // for the team's other warps instead of following it.
  const bool lora = u != nullptr || a.lora_u32 != nullptr;
  const bool vec = a.r % 8 == 0 && reinterpret_cast<uintptr_t>(u) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(a.lora_u32) % 16 == 0 && reinterpret_cast<uintptr_t>(lb) % 16 == 0;
  float bias_v[kPer], lora_v[kPer];
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    const int idx = tid + e * kGemvThreads;
    const int row = idx % kRows, tok = idx / kRows;  // consecutive threads: consecutive outputs of a token
    const int64_t gn = nbase + row;
    const bool ok = idx < kRows * kCols && gn < a.n && tok < a.m;
    bias_v[e] = ok && bias != nullptr ? static_cast<float>(bias[gn]) : 0.0f;
    lora_v[e] = !ok || !lora ? 0.0f
                : a.lora_u32 != nullptr ? lora_dot(a.lora_u32 + tok * a.r, lb + gn * a.r, a.r, vec)
                                        : lora_dot(u + tok * a.r, lb + gn * a.r, a.r, vec);
  }
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
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    const int idx = tid + e * kGemvThreads;
    const int row = idx % kRows, tok = idx / kRows;
    const int64_t gn = nbase + row;
    if (idx >= kRows * kCols || gn >= a.n || tok >= a.m) continue;
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kGemvWarps; ++w) v += red[(w * kRows + row) * kStride + tok];
    if (bias != nullptr) v += bias_v[e];
    if (lora) v += lora_v[e];
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
// Whether the block-aligned kernel computes u = lora_scale * x @ lora_A^T itself for rank r: rank
// tiles of 8, at most one per warp.
inline bool nf4_gemv_blockaligned_computes_u(int64_t r) { return r % 8 == 0 && r <= 128; }
void nf4_gemv_blockaligned_launch(const GemvArgs& a, at::ScalarType dtype, cudaStream_t stream, int sms);

}  // namespace cuda
}  // namespace lora_fused
