// Y = X·dequant(W)ᵀ on Hopper (sm_90a) with W in NF4 (bitsandbytes' packing), never a 16-bit copy
// of W: CUTLASS 3's mixed-input warp-specialised GEMM (TMA, register-sourced wgmma), W's 4-bit codes
// converted to bf16 levels in registers (a byte_perm table lookup) and scaled by bf16 group scales
// (one per 64 consecutive elements of a row: NF4's blocksize 64 when K % 64 == 0).
// Stream-K tile scheduler. Correct on an H100 and an H200 (tests/test_nf4_gemm_sm90.py); 0.5-0.8x
// cuBLAS bf16's speed (scripts/probe_nf4_gemm_sm90.py), so nf4_linear uses it for 17-1024 rows only.
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
  int sm_count = 0;  // the GPU's SMs: the persistent stream-K grid's size
};

// One tile configuration of the GEMM (nf4_gemm_bf16_128x*.cu): its workspace, whether CUTLASS takes
// a problem, and the launch (nullptr on success, else what went wrong).
struct Nf4GemmOps {
  size_t (*workspace_bytes)(const Nf4GemmProblem& p);
  bool (*can_implement)(const Nf4GemmProblem& p);
  const char* (*run)(const Nf4GemmProblem& p, void* workspace, cudaStream_t stream);
};
extern const Nf4GemmOps kNf4Gemm128x128;  // 128 weight rows x 128 tokens per tile
extern const Nf4GemmOps kNf4Gemm128x256;  // 128 weight rows x 256 tokens per tile
// The same with w in nf4_repack's layout (n % 16 == 0): each thread reads its 8 codes of an mma
// fragment as one 32-bit word from shared memory instead of byte by byte.
extern const Nf4GemmOps kNf4Gemm128x128Shuffled;
extern const Nf4GemmOps kNf4Gemm128x256Shuffled;

// dst (n * k / 2 bytes) = the NF4 codes of src (bitsandbytes' packing, [n, k]) reordered for the
// Shuffled GEMMs; n % 16 == 0, k % 64 == 0, both buffers 16-byte aligned. nullptr on success.
const char* nf4_repack(const void* src, void* dst, int n, int k, cudaStream_t stream);

}  // namespace lora_fused::sm90
