// nf4_linear's Hopper path (sm_90): the NF4 x bf16 CUTLASS GEMM for batches between the decode
// kernel's 16 rows and the point where the slab path (decode slabs into cuBLAS) is faster.
#pragma once
#include <ATen/ATen.h>

#include "nf4_linear.h"

namespace lora_fused {
namespace cuda {

// LORA_FUSED_NF4_GEMM (read at each call): auto (unset), sm90, slab, or ss (nf4_linear_ss.h); an error
// for anything else.
enum class Nf4GemmMode { kAuto, kSm90, kSlab, kSs };
Nf4GemmMode nf4_gemm_mode();

// The blocks' scales of W (blocksize 64, K % 64 == 0) rounded to bf16, group-major: [K / 64, ld],
// element [g, row] the scale of W[row, 64 g ... 64 g + 63]; columns past N unwritten. The Hopper GEMMs'
// scale operand, made at each call (N K / 64 values, a few microseconds).
at::Tensor nf4_group_scales(const Nf4Weight& w, int64_t ld);

// Rows of x up to which the Hopper GEMM runs by default: on an H200 (data-parallel tiles) it beat the
// slab path at every measured shape from 256 to 1024 rows (1.1-1.7x) and lost at 4096 (1.1-1.2x;
// benchmarks/RESULTS.md). Tiles of 128 tokens up to kNf4Sm90Tile128MaxM rows, else 256 (faster there).
constexpr int64_t kNf4Sm90MaxM = 1024;
constexpr int64_t kNf4Sm90Tile128MaxM = 128;

// out = x @ W^T + lora_u @ lora_B^T + bias through the Hopper GEMM, and true, where it applies: an
// sm_90 GPU and build, bf16, blocksize 64, K % 64 == 0, N % 8 == 0, 16 < M <= kNf4Sm90MaxM
// (LORA_FUSED_NF4_GEMM=sm90: any M wherever it can run; =slab: never). Else false, out untouched.
// With lora_A (no lora_u), lora_u = lora_scale * x @ lora_A^T is made here once the GEMM takes the call.
bool nf4_linear_sm90(const at::Tensor& x, const Nf4Weight& w, const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& lora_u, const c10::optional<at::Tensor>& lora_B,
                     const c10::optional<at::Tensor>& lora_A, double lora_scale, at::Tensor& out);

}  // namespace cuda
}  // namespace lora_fused
