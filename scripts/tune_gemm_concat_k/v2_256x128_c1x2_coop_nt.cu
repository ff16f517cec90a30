#include "probe.cuh"
PROBE_VARIANT(v2_256x128_c1x2_coop_nt, cutlass::bfloat16_t, true, Shape<_256,_128,_64>, Shape<_1,_2,_1>, cutlass::gemm::KernelTmaWarpSpecializedCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative)
