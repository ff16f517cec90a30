// NF4 codes -> their bf16 levels in registers, with byte_perm table lookups (no shared memory): the
// conversion of the Hopper NF4 GEMMs, which then multiply by a bf16 scale.
#pragma once
#include <cstdint>

namespace lora_fused {
namespace cuda {

// The four lookup words that byte_perm must read from registers (the other four ride as immediates).
// As constants, in a loop the compiler keeps them in uniform registers, which byte_perm cannot read,
// and copies them into fresh registers before each use (62 of the SS GEMM's ~370 decode
// instructions per k-tile); loaded from memory (store, then load), they stay in ordinary registers.
struct Nf4LevelTables {
  uint32_t lo0 = 0xca063280u, lo2 = 0xad7c25a3u, hi0 = 0xbebfbfbfu, hi2 = 0x3e3e3e3du;
  __device__ __forceinline__ static void store(uint32_t* words) {
    const Nf4LevelTables t;
    words[0] = t.lo0;
    words[1] = t.lo2;
    words[2] = t.hi0;
    words[3] = t.hi2;
  }
  __device__ __forceinline__ static Nf4LevelTables load(const uint32_t* words) {
    Nf4LevelTables t;
    t.lo0 = words[0];
    t.lo2 = words[1];
    t.hi0 = words[2];
    t.hi2 = words[3];
    return t;
  }
};

// 4 NF4 codes -> their bf16 levels' low bytes (lo) and high bytes (hi), byte n each, from the codes'
// selectors: sel3 = the codes' bits 0-2 (nibble n: code n & 7), pick = 4 * bit 3 + n (nibble n).
// Per byte plane two 8-entry tables (levels 0-7, 8-15) are looked up with bits 0-2, then one
// byte_perm picks, byte by byte, the table that bit 3 names (selector nibble n + 4 reads the second
// word): 6 byte_perms. (__byte_perm reads 3 bits of a selector nibble, so bit 3 cannot select
// directly; it reads only the selector's low 16 bits.) Checked against the bf16-rounded levels of
// nf4_format.h for all 65536 selectors by an emulation of byte_perm.
__device__ __forceinline__ void nf4_level_bytes4(uint32_t sel3, uint32_t pick, const Nf4LevelTables& t, uint32_t& lo,
                                                 uint32_t& hi) {
  constexpr uint32_t lo1 = 0x00ba3d92u, lo3 = 0x803910e2u, hi1 = 0x00bdbebeu, hi3 = 0x3f3f3f3eu;
  lo = __byte_perm(__byte_perm(t.lo0, lo1, sel3), __byte_perm(t.lo2, lo3, sel3), pick);
  hi = __byte_perm(__byte_perm(t.hi0, hi1, sel3), __byte_perm(t.hi2, hi3, sel3), pick);
}

// 4 NF4 codes (the 4-bit nibbles of sel's low 16 bits; nibble n decides byte n) -> lo, hi as above.
__device__ __forceinline__ void nf4_level_bytes4(uint32_t sel, uint32_t& lo, uint32_t& hi) {
  nf4_level_bytes4(sel & 0x7777u, ((sel >> 1) & 0x4444u) | 0x3210u, Nf4LevelTables{}, lo, hi);
}

// 8 codes in bitsandbytes' packing (one 32-bit word: element 2j in byte j's HIGH nibble) -> their 8
// bf16 levels, two per word, element 2i in the low half of o[i]. Byte n of a half's level bytes
// belongs to nibble n, so the final byte_perms take bytes (1, 0) and (3, 2): no nibble swap. Both
// halves' selectors are made at once (the high half's by a shift).
__device__ __forceinline__ void nf4_levels8_bf16(uint32_t w, uint32_t (&o)[4], const Nf4LevelTables& t = Nf4LevelTables{}) {
  const uint32_t sel3 = w & 0x77777777u, pick = ((w >> 1) & 0x44444444u) | 0x32103210u;
  uint32_t lo, hi;
  nf4_level_bytes4(sel3, pick, t, lo, hi);
  o[0] = __byte_perm(lo, hi, 0x4051u);
  o[1] = __byte_perm(lo, hi, 0x6273u);
  nf4_level_bytes4(sel3 >> 16, pick >> 16, t, lo, hi);
  o[2] = __byte_perm(lo, hi, 0x4051u);
  o[3] = __byte_perm(lo, hi, 0x6273u);
}

}  // namespace cuda
}  // namespace lora_fused
