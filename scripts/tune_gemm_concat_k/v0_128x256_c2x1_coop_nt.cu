#include "probe.cuh"
PROBE_VARIANT(v0_128x256_c2x1_coop_nt, cutlass::bfloat16_t, true, Shape<_128,_256,_64>, Shape<_2,_1,_1>, cutlass::gemm::KernelTmaWarpSpecializedCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative)
