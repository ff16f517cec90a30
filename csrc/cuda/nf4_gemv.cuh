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
#include "cuda/lora_shrink_partials.h"
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
  const void* bias;  // [n] or nullptr
  // The LoRA term u @ lora_B^T, u [m, r] either given (lora_u) or lora_scale times the sum, in split
  // order, of lora_splits fp32 partial products [lora_splits][m][r] of x @ lora_A^T (lora_parts,
  // lora_shrink_partials.h; the block-aligned kernel adds them once it has waited for that grid).
  const void* lora_u;
  const float* lora_parts;
  int lora_splits;
  float lora_scale;
  const void* lora_B;  // [n, r]
  int r;
  // Block-aligned kernel: u and each strip's lora_B rows staged in shared memory (r % 8 == 0, lora_B
  // 16-byte aligned); lora_parts needs it.
  bool lora_smem;
  // Block-aligned kernel: each strip's sums made one strip later, through two reduction buffers and
  // mbarriers instead of two team barriers a strip (nf4_gemv_defer_sums; with lora_smem, four
  // lora_B buffers a team instead of two).
  bool defer_sums;
  // Block-aligned kernel: a team's strips walk K alternately forwards and backwards, so that a strip
  // starts on the columns of x that the last one ended on, still in L1 (nf4_gemv_serpentine).
  bool serpentine;
  // Block-aligned kernel: a thread's elements of u (up to 64 ranks) loaded together, in one round
  // trip, instead of one by one (nf4_gemv_u_together).
  bool u_together;
  // Block-aligned kernel: 32-row warp steps below 2^25 weights too (where 16-row steps have no room
  // for the LoRA staging and 32-row steps do).
  bool two_rows;
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

// sum_q u[q] * b[q] in fp32, q ascending, from global memory; 16-byte loads where the rows allow (vec).
template <typename T>
__device__ __forceinline__ float lora_dot(const T* u, const T* b, int r, bool vec) {
  float l = 0.0f;
  if (vec) {
#pragma unroll 4
    for (int q = 0; q < r; q += 8) {
      const uint4 uv = __ldg(reinterpret_cast<const uint4*>(u + q)), bv = __ldg(reinterpret_cast<const uint4*>(b + q));
      const T* ue = reinterpret_cast<const T*>(&uv);
      const T* be = reinterpret_cast<const T*>(&bv);
#pragma unroll
      for (int e = 0; e < 8; ++e) l = fma_acc(static_cast<float>(ue[e]), static_cast<float>(be[e]), l);
    }
  } else {
    for (int q = 0; q < r; ++q) l = fma_acc(static_cast<float>(u[q]), static_cast<float>(b[q]), l);
  }
  return l;
}

// Row stride (elements) of a strip's staged lora_B rows in shared memory (r % 8 == 0): r, or r + 8
// where r / 8 is even, so that the 16-byte chunks that a warp's lanes (consecutive rows) read at one
// column fall on all 8 bank groups. With a stride of r, r = 64 put a warp's 32 rows on one group (32
// wavefronts a load instead of 4) and r = 16 on four: QLoRA decode at 16 tokens and r = 64 took
// 1.3-1.45x the NF4 matmul alone with u given (session 34).
__host__ __device__ constexpr int lora_b_stride(int r) { return (r / 8) % 2 == 0 ? r + 8 : r; }

// The same from shared memory: u fp32, b T, r % 8 == 0 and 16-byte aligned rows.
template <typename T>
__device__ __forceinline__ float lora_dot_smem(const float* u, const T* b, int r) {
  float l = 0.0f;
#pragma unroll 4
  for (int q = 0; q < r; q += 8) {
    const float4 u0 = *reinterpret_cast<const float4*>(u + q), u1 = *reinterpret_cast<const float4*>(u + q + 4);
    const uint4 bv = *reinterpret_cast<const uint4*>(b + q);
    const float ue[8] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};
    const T* be = reinterpret_cast<const T*>(&bv);
#pragma unroll
    for (int e = 0; e < 8; ++e) l = fma_acc(ue[e], static_cast<float>(be[e]), l);
  }
  return l;
}

// Output e of thread tid (of its team) in a strip of 16 R rows and 8 NT tokens: consecutive threads
// take consecutive rows of a token.
template <int R, int NT>
struct StripOutput {
  static constexpr int kRows = 16 * R, kCols = 8 * NT, kStride = kCols + 1;
  static constexpr int kPer = (kRows * kCols + kGemvThreads - 1) / kGemvThreads;  // outputs per thread
  int row, tok;
  int64_t gn;
  bool ok;
  __device__ __forceinline__ StripOutput(const GemvArgs& a, int64_t nbase, int tid, int e) {
    const int idx = tid + e * kGemvThreads;
    row = idx % kRows;
    tok = idx / kRows;
    gn = nbase + row;
    ok = idx < kRows * kCols && gn < a.n && tok < a.m;
  }
};

// Bias + LoRA term of each of this thread's outputs of the strip at nbase. The LoRA term comes from
// u_s [m][r] and the strip's lora_B rows b_s [16 R][r] in shared memory when given, else from global
// memory.
template <typename T, int R, int NT>
__device__ __forceinline__ void gemv_strip_extras(const GemvArgs& a, int64_t nbase, int tid, const float* u_s,
                                                  const T* b_s, float (&extra)[StripOutput<R, NT>::kPer]) {
  const T* bias = static_cast<const T*>(a.bias);
  const T* u = static_cast<const T*>(a.lora_u);
  const T* lb = static_cast<const T*>(a.lora_B);
  const bool lora = u != nullptr || u_s != nullptr;
  const bool vec = a.r % 8 == 0 && reinterpret_cast<uintptr_t>(u) % 16 == 0 && reinterpret_cast<uintptr_t>(lb) % 16 == 0;
#pragma unroll
  for (int e = 0; e < StripOutput<R, NT>::kPer; ++e) {
    const StripOutput<R, NT> o(a, nbase, tid, e);
    float v = o.ok && bias != nullptr ? static_cast<float>(bias[o.gn]) : 0.0f;
    if (o.ok && lora)
      v += u_s != nullptr ? lora_dot_smem(u_s + o.tok * a.r, b_s + o.row * lora_b_stride(a.r), a.r)
                          : lora_dot(u + o.tok * a.r, lb + o.gn * a.r, a.r, vec);
    extra[e] = v;
  }
}

// acc[i][j]: this lane's mma accumulators for rows 16i + g (q = 0, 1) and 16i + g + 8 (q = 2, 3),
// tokens 8j + 2t + (q & 1), into its warp's rows of red [kGemvWarps][16 R][8 NT + 1].
template <int R, int NT>
__device__ __forceinline__ void gemv_strip_partials(float* red, const float (&acc)[R][NT][4], int tid) {
  constexpr int kRows = StripOutput<R, NT>::kRows, kStride = StripOutput<R, NT>::kStride;
  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q)
        red[(warp * kRows + 16 * i + g + 8 * (q >> 1)) * kStride + 8 * j + 2 * t + (q & 1)] = acc[i][j][q];
}

// out[tok][nbase + row] = the team's warps' partials in red, in warp order, + extra.
template <typename T, int R, int NT>
__device__ __forceinline__ void gemv_strip_store(const GemvArgs& a, const float* red, int64_t nbase, int tid,
                                                 const float (&extra)[StripOutput<R, NT>::kPer]) {
  constexpr int kRows = StripOutput<R, NT>::kRows, kStride = StripOutput<R, NT>::kStride;
  T* out = static_cast<T*>(a.out);
#pragma unroll
  for (int e = 0; e < StripOutput<R, NT>::kPer; ++e) {
    const StripOutput<R, NT> o(a, nbase, tid, e);
    if (!o.ok) continue;
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kGemvWarps; ++w) v += red[(w * kRows + o.row) * kStride + o.tok];
    out[o.tok * a.n + o.gn] = static_cast<T>(v + extra[e]);
  }
}

// Sums the strip's accumulators over the team's kGemvWarps warps (tid: the thread's index in its
// team, bar_id: the team's barrier) and writes out[tok][nbase + row], + bias + the LoRA term (from
// u_s and b_s when given: gemv_strip_extras). Every thread of the team calls it once per strip.
template <typename T, int R, int NT>
__device__ __forceinline__ void gemv_finish_strip(const GemvArgs& a, float* red, const float (&acc)[R][NT][4],
                                                  int64_t nbase, int tid, int bar_id, const float* u_s = nullptr,
                                                  const T* b_s = nullptr) {
  // Bias and LoRA term before the barrier: their loads overlap the wait for the team's other warps
  // instead of following it.
  float extra[StripOutput<R, NT>::kPer];
  gemv_strip_extras<T, R, NT>(a, nbase, tid, u_s, b_s, extra);
  gemv_strip_partials<R, NT>(red, acc, tid);
  gemv_team_barrier(bar_id);
  gemv_strip_store<T, R, NT>(a, red, nbase, tid, extra);
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
// Whether the block-aligned kernel's shared memory for a (its ring and table, and what a.lora_smem
// and a.defer_sums add) fits this GPU.
bool nf4_gemv_blockaligned_fits(const GemvArgs& a, at::ScalarType dtype);
// Whether to defer the block-aligned kernel's strip sums where they fit: yes, unless
// LORA_FUSED_NF4_GEMV_DEFER=0.
bool nf4_gemv_defer_sums();
bool nf4_gemv_serpentine();
bool nf4_gemv_u_together();
// pdl: the kernel may start while the previous kernel in the stream (the shrink) still runs.
void nf4_gemv_blockaligned_launch(const GemvArgs& a, at::ScalarType dtype, cudaStream_t stream, int sms, bool pdl);

}  // namespace cuda
}  // namespace lora_fused
