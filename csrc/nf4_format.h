// The NF4 format, shared by host and device code so both round the same way (bitsandbytes layout):
// blocks of `blocksize` consecutive elements of the row-major flattened weight; each element is
// scaled by 1/absmax(block) and mapped to the nearest of 16 levels, ties to the lower level
// (bitsandbytes: bucketize over fp32 midpoints); byte j holds element 2j in its high nibble.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define LF_HD __host__ __device__ __forceinline__
#else
#define LF_HD inline
#endif

namespace lora_fused {
namespace nf4 {

// bitsandbytes' get_4bit_type("nf4"); index = nibble.
LF_HD constexpr float level(int i) {
  switch (i) {
    case 0: return -1.0f;
    case 1: return -0.6961928009986877f;
    case 2: return -0.5250730514526367f;
    case 3: return -0.39491748809814453f;
    case 4: return -0.28444138169288635f;
    case 5: return -0.18477343022823334f;
    case 6: return -0.09105003625154495f;
    case 7: return 0.0f;
    case 8: return 0.07958029955625534f;
    case 9: return 0.16093020141124725f;
    case 10: return 0.24611230194568634f;
    case 11: return 0.33791524171829224f;
    case 12: return 0.44070982933044434f;
    case 13: return 0.5626170039176941f;
    case 14: return 0.7229568362236023f;
    default: return 1.0f;
  }
}

// Nibble for a value already scaled by 1/absmax: the number of fp32 midpoints strictly below it,
// so a value exactly on a midpoint takes the lower level. The loop unrolls into 15 compares
// against constants.
LF_HD int quantize_scaled(float x) {
  int q = 0;
#ifdef __CUDACC__
#pragma unroll
#endif
  for (int i = 0; i < 15; ++i) q += x > 0.5f * (level(i) + level(i + 1)) ? 1 : 0;
  return q;
}

// bitsandbytes guards the reciprocal with clamp(min=1e-38): an all-zero block scales to 0 (level 7).
LF_HD float inverse_absmax(float absmax) { return 1.0f / (absmax > 1e-38f ? absmax : 1e-38f); }

// The padding nibble of an odd element count: bitsandbytes pads with 0.0, which is level 7.
constexpr uint8_t kPadNibble = 7;

}  // namespace nf4
}  // namespace lora_fused
