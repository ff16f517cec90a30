// The probe's C entry (probe.py calls it through ctypes) into csrc/cuda/sm90/nf4_ss_gemm.cu.
#include <cstdint>
#include <cstdio>

#include "cuda/sm90/nf4_ss_gemm.h"

// mode: Nf4SsProblem's probe flags (1: skip the decode, 2: skip the output stores; timing only).
// scales: bf16 [k / 64, scales_ld] (nf4_ss_gemm.h); r > 0: lora_w (lora_B forward, lora_A backward) and
// lora_act (u or du). Returns 0, or 1 when the kernel does not take the problem, 2 when the launch
// failed (the reason is printed).
extern "C" int nf4_ss_gemm(int mode, int trans, int m, int n, int k, const void* act, const void* packed,
                           const void* scales, long long scales_ld, const void* lora_w, int r, const void* lora_act,
                           void* y, void* stream) {
  lora_fused::sm90::Nf4SsProblem p;
  p.m = m;
  p.n = n;
  p.k = k;
  p.trans = trans != 0;
  p.act = act;
  p.packed = static_cast<const uint8_t*>(packed);
  p.scales = scales;
  p.scales_ld = scales_ld;
  p.lora_w = lora_w;
  p.r = r;
  p.lora_act = lora_act;
  p.y = y;
  p.probe_flags = mode & 3;
  if (const char* why = lora_fused::sm90::nf4_ss_gemm_check(p)) {
    std::fprintf(stderr, "nf4_ss_gemm: %s\n", why);
    return 1;
  }
  if (const char* why = lora_fused::sm90::nf4_ss_gemm_run(p, static_cast<cudaStream_t>(stream))) {
    std::fprintf(stderr, "nf4_ss_gemm: %s\n", why);
    return 2;
  }
  return 0;
}
