// Host side of the NF4 GEMM with a decoding warpgroup (nf4_ss_gemm.cu), free of CUTLASS and ATen so
// that nf4_linear's dispatch (csrc/cuda/) and the probe (scripts/probe_nf4_ss_gemm/) include it alike.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace lora_fused::sm90 {

// trans false: y [m, n] = act [m, k] . W^T (+ lora_act [m, r] . lora_B^T + bias);
// trans true:  y [m, k] = act [m, n] . W (+ lora_act [m, r] . lora_A).
// W [n, k]: NF4 codes in bitsandbytes' packing, one scale per 64 consecutive elements (k % 64 == 0).
// All 16-bit tensors bf16, rows contiguous; act, packed, lora_w and lora_act 16-byte aligned.
struct Nf4SsProblem {
  int m = 0, n = 0, k = 0;
  bool trans = false;
  const void* act = nullptr;
  const uint8_t* packed = nullptr;
  // The blocks' scales, rounded to bf16, group-major: scales[g * scales_ld + row] for W row `row`,
  // columns 64 g ... 64 g + 63 (nf4_linear_sm90.h's nf4_group_scales makes them).
  const void* scales = nullptr;
  int64_t scales_ld = 0;  // >= n, a multiple of 8
  const void* lora_w = nullptr;          // lora_B [n, r] (forward) or lora_A [r, k] (backward)
  const void* lora_act = nullptr;        // u = s x A^T or du = s dY B, [m, r]
  int r = 0;                             // 0: no LoRA term; else r % 8 == 0
  const void* bias = nullptr;            // [n], forward only
  void* y = nullptr;
  // Split reduction (few output tiles: small m): splits > 1 CTA pairs per output tile, each over
  // a share of the reduction, write fp32 sums to partials [splits, m, features] (the caller's,
  // 16-byte aligned for full speed); a second kernel adds them into y. 1 <= splits <= the
  // reduction's 64-column tiles; nf4_ss_gemm_splits picks it.
  int splits = 1;
  float* partials = nullptr;
  // Probes only (results are wrong): kSkipDecode leaves the A tiles stale, kSkipStores writes no
  // output, to time the rest.
  static constexpr int kSkipDecode = 1, kSkipStores = 2;
  int probe_flags = 0;
};

// nullptr when the kernel takes p (shapes, strides, alignments), else why not.
const char* nf4_ss_gemm_check(const Nf4SsProblem& p);

// The split count for p on a GPU of sm_count SMs: 1 where the output tiles fill the GPU, up to 4.
int nf4_ss_gemm_splits(const Nf4SsProblem& p, int sm_count);

// Runs it on `stream`: nullptr on success, else what failed. The caller checks first.
const char* nf4_ss_gemm_run(const Nf4SsProblem& p, cudaStream_t stream);

}  // namespace lora_fused::sm90
