// D = A1·B1ᵀ + A2·B2ᵀ + bias on Hopper (sm_90a): a CUTLASS 3 warp-specialised cooperative GEMM
// (TMA, wgmma, persistent tile scheduler) with the ConcatKMainloop producer, bias as a per-column
// broadcast in the epilogue. bf16/fp16 in, fp32 accumulation, D row-major [M, N] in the input dtype.
// Tile 128x256x64, cluster 2x1: the configuration of shared/examples/cutlass_sm90_gemm, which ran
// 8192³ at 726 TFLOP/s beside cuBLAS's 731 on an H100.
//
// Each instantiation lives in its own .cu (gemm_concat_k_<dtype>_<layout>.cu), so a change to one
// recompiles one, and the files compile in parallel.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lora_fused::sm90 {

// A1 [M, K1] and A2 [M, K2] row-major (unit stride along K). B1, B2: with b_k_major, [N, K] with
// unit stride along K (a weight W [N, K] as is); otherwise [K, N] with unit stride along N (W used
// as W, i.e. D = X·W with W [K_gemm, N]). Leading dimensions are in elements.
struct ConcatKProblem {
  int m = 0, n = 0, k1 = 0, k2 = 0;
  const void* a1 = nullptr;
  const void* b1 = nullptr;
  const void* a2 = nullptr;
  const void* b2 = nullptr;
  int64_t lda1 = 0, ldb1 = 0, lda2 = 0, ldb2 = 0;
  const void* bias = nullptr;  // [N] or null
  void* d = nullptr;           // [M, N], leading dimension n
  int sm_count = 0;
  // Tile order of the persistent scheduler: tiles are visited in groups of `swizzle` (1, 2, 4, 8)
  // along the minor direction, so a wave's operand panels stay in L2; raster 0 = CUTLASS's
  // heuristic, 1 = along M, 2 = along N.
  int swizzle = 1;
  int raster = 0;
};

// Defined per instantiation; T is cutlass::bfloat16_t or cutlass::half_t. Returns nullptr on
// success, else what went wrong (a CUTLASS status or a CUDA error), for the caller's TORCH_CHECK.
// workspace_bytes(p) bytes of device memory must be passed in `workspace`.
template <class T, bool kBKMajor>
size_t gemm_concat_k_workspace_bytes(const ConcatKProblem& p);

template <class T, bool kBKMajor>
const char* gemm_concat_k_run(const ConcatKProblem& p, void* workspace, cudaStream_t stream);

// Whether the CUTLASS templates can take the problem (alignment of every pointer and stride).
template <class T, bool kBKMajor>
bool gemm_concat_k_can_implement(const ConcatKProblem& p);

}  // namespace lora_fused::sm90
