#include "probe.cuh"
PROBE_VARIANT(v1_128x256_c1x2_coop_nt, cutlass::bfloat16_t, true, Shape<_128,_256,_64>, Shape<_1,_2,_1>, cutlass::gemm::KernelTmaWarpSpecializedCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative)
