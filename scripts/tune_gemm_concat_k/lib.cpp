// Tuning probe: the table of gemm_concat_k configurations that probe.py times (one per v*.cu).
#include <cstddef>
#include "cuda/sm90/gemm_concat_k.cuh"
using lora_fused::sm90::ConcatKProblem;
#define V(n) extern "C" int n(const ConcatKProblem*, void*, size_t);
V(v0_128x256_c2x1_coop_nt) V(v1_128x256_c1x2_coop_nt) V(v2_256x128_c1x2_coop_nt)
V(v4_128x128_c2x1_coop_nt) V(v5_128x256_c1x1_coop_nt) V(v0_128x256_c2x1_coop_nn) V(v2_256x128_c1x2_coop_nn)
typedef int (*Fn)(const ConcatKProblem*, void*, size_t);
static Fn fns[] = {v0_128x256_c2x1_coop_nt, v1_128x256_c1x2_coop_nt, v2_256x128_c1x2_coop_nt,
                   v4_128x128_c2x1_coop_nt, v5_128x256_c1x1_coop_nt, v0_128x256_c2x1_coop_nn, v2_256x128_c1x2_coop_nn};
extern "C" int probe_run(int v, int m, int n, int k1, int k2, void* a, void* b, void* a2, void* b2, void* d, long lda1,
                         long ldb1, long lda2, long ldb2, int swizzle, int raster, int sms, void* ws, size_t ws_bytes) {
  ConcatKProblem p;
  p.m = m; p.n = n; p.k1 = k1; p.k2 = k2; p.a1 = a; p.b1 = b; p.a2 = a2; p.b2 = b2; p.d = d;
  p.lda1 = lda1; p.ldb1 = ldb1; p.lda2 = lda2; p.ldb2 = ldb2; p.swizzle = swizzle; p.raster = raster; p.sm_count = sms;
  return fns[v](&p, ws, ws_bytes);
}
