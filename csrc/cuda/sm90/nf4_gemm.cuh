// Y = X·dequant(W)ᵀ on Hopper (sm_90a) with W in NF4 (bitsandbytes' packing), never a 16-bit copy
// of W: CUTLASS 3's mixed-input warp-specialised GEMM (TMA, register-sourced wgmma), W's 4-bit codes
// converted to bf16 levels in registers (a byte_perm table lookup) and scaled by bf16 group scales
// (one per 64 consecutive elements of a row: NF4's blocksize 64 when K % 64 == 0).
// Correct on an H100 (tests/test_nf4_gemm_sm90.py) but at 0.5-0.6x cuBLAS bf16's speed
// (scripts/probe_nf4_gemm_sm90.py; 4-bit A fragments read from unshuffled shared memory): not used by
// nf4_linear yet.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace lora_fused::sm90 {

// x [m, k] bf16 row-major; w [n, k] NF4 codes, 2 per byte, element 2j in byte j's high nibble;
// scales [k / 64, n] bf16 row-major (the collective wants them N-contiguous); y [m, n] bf16
// row-major.
struct Nf4GemmProblem {
  int m = 0, n = 0, k = 0;
  const void* x = nullptr;
  const void* w = nullptr;
  const void* scales = nullptr;
  void* y = nullptr;
};

size_t nf4_gemm_workspace_bytes(const Nf4GemmProblem& p);
bool nf4_gemm_can_implement(const Nf4GemmProblem& p);
// nullptr on success, else what went wrong.
const char* nf4_gemm_run(const Nf4GemmProblem& p, void* workspace, cudaStream_t stream);

}  // namespace lora_fused::sm90
