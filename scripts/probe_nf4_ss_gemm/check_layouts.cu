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

template <bool kTrans>
int mismatches() {
  Tensor sA = make_tensor(make_smem_ptr(buf), SmemLayoutA<kTrans>{});
  int bad = 0;
  for (int s = 0; s < 4; ++s)
    for (int t = 0; t < 128; ++t)
      for (int c = 0; c < 8; ++c)
        for (int e = 0; e < 8; ++e) {
          const unsigned key = kTrans ? (t / 2) % 8 : t % 8;
          const unsigned a_base = kTrans ? 1024 * (t % 2) + 2048 * (t / 16) + 128 * key : 1024 * (t / 8) + 128 * key;
          const unsigned addr = a_base + s * (128 * 64 * 2) + 16 * (c ^ key) + 2 * e;
          // The element: forward (MMA row t, column 8c + e); backward (row 64 (t % 2) + 8c + e, column t / 2).
          T* p = kTrans ? &sA(64 * (t % 2) + 8 * c + e, t / 2, s) : &sA(t, 8 * c + e, s);
          if (static_cast<unsigned>(reinterpret_cast<char*>(p) - reinterpret_cast<char*>(buf)) != addr) ++bad;
        }
  return bad;
}

int main() {
  const int f = mismatches<false>(), b = mismatches<true>();
  std::printf("forward mismatches %d, backward mismatches %d\n", f, b);
  return f + b == 0 ? 0 : 1;
}
