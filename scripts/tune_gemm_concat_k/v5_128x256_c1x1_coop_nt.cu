#include "probe.cuh"
PROBE_VARIANT(v5_128x256_c1x1_coop_nt, cutlass::bfloat16_t, true, Shape<_128,_256,_64>, Shape<_1,_1,_1>, cutlass::gemm::KernelTmaWarpSpecializedCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative)
