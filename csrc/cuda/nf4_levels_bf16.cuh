// NF4 codes -> their bf16 levels in registers, with byte_perm table lookups (no shared memory): the
// conversion of the Hopper NF4 GEMMs, which then multiply by a bf16 scale.
#pragma once
#include <cstdint>

namespace lora_fused {
namespace cuda {

// 4 NF4 codes (the 4-bit nibbles of sel's low 16 bits; nibble n decides byte n) -> their bf16
// levels' low bytes (lo) and high bytes (hi), byte n each. Per byte plane two 8-entry tables (levels
// 0-7, 8-15) are looked up with the codes' bits 0-2, then one byte_perm picks, byte by byte, the
// table that bit 3 names (selector nibble n + 4 reads the second word): 9 instructions for 4 codes.
// (__byte_perm reads 3 bits of a selector, so bit 3 cannot select directly.) Checked against the
// bf16-rounded levels of nf4_format.h for all 65536 selectors by an emulation of byte_perm.
__device__ __forceinline__ void nf4_level_bytes4(uint32_t sel, uint32_t& lo, uint32_t& hi) {
  constexpr uint32_t lo0 = 0xca063280u, lo1 = 0x00ba3d92u, lo2 = 0xad7c25a3u, lo3 = 0x803910e2u;
  constexpr uint32_t hi0 = 0xbebfbfbfu, hi1 = 0x00bdbebeu, hi2 = 0x3e3e3e3du, hi3 = 0x3f3f3f3eu;
  const uint32_t sel3 = sel & 0x7777u;
  const uint32_t pick = ((sel >> 1) & 0x4444u) | 0x3210u;
  lo = __byte_perm(__byte_perm(lo0, lo1, sel3), __byte_perm(lo2, lo3, sel3), pick);
  hi = __byte_perm(__byte_perm(hi0, hi1, sel3), __byte_perm(hi2, hi3, sel3), pick);
}

// 8 codes in bitsandbytes' packing (one 32-bit word: element 2j in byte j's HIGH nibble) -> their 8
// bf16 levels, two per word, element 2i in the low half of o[i]. Byte n of a half's level bytes
// belongs to nibble n, so the final byte_perms take bytes (1, 0) and (3, 2): no nibble swap.
__device__ __forceinline__ void nf4_levels8_bf16(uint32_t w, uint32_t (&o)[4]) {
  uint32_t lo, hi;
  nf4_level_bytes4(w, lo, hi);
  o[0] = __byte_perm(lo, hi, 0x4051u);
  o[1] = __byte_perm(lo, hi, 0x6273u);
  nf4_level_bytes4(w >> 16, lo, hi);
  o[2] = __byte_perm(lo, hi, 0x4051u);
  o[3] = __byte_perm(lo, hi, 0x6273u);
}

}  // namespace cuda
}  // namespace lora_fused
