// The probe's C entry (probe.py calls it through ctypes) into csrc/cuda/sm90/nf4_ss_gemm.cu.
#include <cstdint>
#include <cstdio>

#include "cuda/sm90/nf4_ss_gemm.h"

// mode: Nf4SsProblem's probe flags (1: skip the decode, 2: skip the output stores; timing only), plus
// 4: the staged epilogue, 8: the persistent grid. absmax fp32, or null with codes / nested_absmax / nested_code
// / offset; r > 0: lora_w (lora_B forward, lora_A backward) and lora_act (u or du). Returns 0, or 1
// when the kernel does not take the problem, 2 when the launch failed (the reason is printed).
extern "C" int nf4_ss_gemm(int mode, int trans, int m, int n, int k, const void* act, const void* packed,
                           const void* absmax, const void* codes, const void* nested_absmax, const void* nested_code,
                           float offset, const void* lora_w, int r, const void* lora_act, void* y, void* stream) {
  lora_fused::sm90::Nf4SsProblem p;
  p.m = m;
  p.n = n;
  p.k = k;
  p.trans = trans != 0;
  p.act = act;
  p.packed = static_cast<const uint8_t*>(packed);
  p.absmax = static_cast<const float*>(absmax);
  p.codes = static_cast<const uint8_t*>(codes);
  p.nested_absmax = static_cast<const float*>(nested_absmax);
  p.nested_code = static_cast<const float*>(nested_code);
  p.offset = offset;
  p.lora_w = lora_w;
  p.r = r;
  p.lora_act = lora_act;
  p.y = y;
  p.probe_flags = mode & 3;
  p.staged_epilogue = (mode & 4) != 0;
  p.persistent = (mode & 8) != 0;
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
