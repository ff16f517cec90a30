// A 16-byte read-only load with optional streaming hints, for the decode kernels' weight stream.
#pragma once
#include <cuda_runtime.h>

#include "cuda/common.cuh"

namespace lora_fused {
namespace cuda {

// load_nc16 with streaming hints (kStream): not kept in L1 (where x lives), and a miss fetches the
// whole 256-byte block into L2 (the next steps' bytes of the same row).
template <bool kStream>
__device__ __forceinline__ uint4 load_nc16_hinted(const void* p) {
  if constexpr (!kStream) return load_nc16(p);
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

}  // namespace cuda
}  // namespace lora_fused
