// Host-only check (no GPU): the shared-memory byte addresses nf4_ss_gemm.cu's decode warpgroup
// computes for each (thread, chunk, element, stage) against CuTe's K-major (forward) and MN-major
// (backward) 128-byte-swizzled layouts, the ones its wgmma descriptors are made from. Update it with
// the kernel's a_base / key formulas.
//
//   nvcc -std=c++17 --expt-relaxed-constexpr -I$CUTLASS/include check_layouts.cu -o /tmp/check && /tmp/check
#include <cstdio>

#include <cute/tensor.hpp>

using namespace cute;
using T = cutlass::bfloat16_t;
template <bool kTrans>
using SmemLayoutA = decltype(tile_to_shape(
    cute::conditional_t<kTrans, GMMA::Layout_MN_SW128_Atom<T>, GMMA::Layout_K_SW128_Atom<T>>{},
    make_shape(Int<128>{}, Int<64>{}, Int<4>{})));
alignas(1024) static T buf[128 * 64 * 4];  // the kernel's tiles start 1 KiB-aligned too

// Each CTA `rank` of the pair writes half the tile: thread t's chunk q (0-3) holds 8 consecutive
// elements; also checked: every element written exactly once by the pair, rank r's warp w's in bytes
// 8192 r + 2048 w ... + 2047 of the stage (the part its bulk copy sends the peer).
template <bool kTrans>
int mismatches() {
  Tensor sA = make_tensor(make_smem_ptr(buf), SmemLayoutA<kTrans>{});
  static int hits[128 * 64 * 4];
  int bad = 0;
  for (int i = 0; i < 128 * 64 * 4; ++i) hits[i] = 0;
  for (int s = 0; s < 4; ++s)
    for (int rank = 0; rank < 2; ++rank)
      for (int t = 0; t < 128; ++t)
        for (int q = 0; q < 4; ++q)
          for (int e = 0; e < 8; ++e) {
            const unsigned fi = 64 * rank + t / 2, bj = 32 * rank + t / 4;
            const unsigned key = kTrans ? bj % 8 : fi % 8;
            const unsigned a_base = kTrans ? 1024 * ((t % 4) / 2) + 2048 * (bj / 8) + 128 * key : 1024 * (fi / 8) + 128 * key;
            const unsigned addr = a_base + s * (128 * 64 * 2) + 16 * ((4 * (t % 2) + q) ^ key) + 2 * e;
            // The element: forward (MMA row fi, column 32 (t % 2) + 8q + e); backward (row 32 (t % 4) + 8q + e, column bj).
            T* p = kTrans ? &sA(32 * (t % 4) + 8 * q + e, bj, s) : &sA(fi, 32 * (t % 2) + 8 * q + e, s);
            const unsigned off = static_cast<unsigned>(reinterpret_cast<char*>(p) - reinterpret_cast<char*>(buf));
            if (off != addr) ++bad;
            if (off / 2048 != 8 * s + 4 * rank + t / 32) ++bad;  // outside this warp's 2 KiB of its rank's half
            ++hits[off / 2];
          }
  for (int i = 0; i < 128 * 64 * 4; ++i) bad += hits[i] != 1;
  return bad;
}

int main() {
  const int f = mismatches<false>(), b = mismatches<true>();
  std::printf("forward mismatches %d, backward mismatches %d\n", f, b);
  return f + b == 0 ? 0 : 1;
}
