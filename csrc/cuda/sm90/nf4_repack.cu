// nf4_repack (nf4_gemm.cuh): bitsandbytes-packed NF4 codes into the Shuffled GEMMs' layout. One
// thread per 16 x 16 atom: it reads the atom's 16 rows of 8 bytes, places each code at the offset
// the GEMM's own layout object gives (so the two cannot disagree), and writes the atom's 128 bytes.
#include "cuda/sm90/nf4_gemm.cuh"
#include "cuda/sm90/nf4_gemm_impl.cuh"

namespace lora_fused::sm90 {
namespace {

__global__ void nf4_repack_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst, int n, int k,
                                  nf4_gemm_detail::LayoutWShuffled layout) {
  const int64_t atoms_n = n / 16, atoms = atoms_n * (k / 16);
  const int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (a >= atoms) return;
  const int n0 = static_cast<int>(a % atoms_n) * 16, k0 = static_cast<int>(a / atoms_n) * 16;
  const int64_t base = layout(n0, k0, 0);  // the atom's first offset (its own offsets run 0..255)
  uint32_t out[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) out[i] = 0;
  for (int m = 0; m < 16; ++m) {
    const uint2 row = *reinterpret_cast<const uint2*>(src + ((static_cast<int64_t>(n0 + m) * k + k0) >> 1));
    const uint32_t words[2] = {row.x, row.y};
    for (int kk = 0; kk < 16; ++kk) {
      const uint32_t byte = (words[kk >> 3] >> (8 * ((kk >> 1) & 3))) & 0xffu;
      const uint32_t code = (kk & 1) ? (byte & 0xfu) : (byte >> 4);  // bitsandbytes: element 2j high
      const int o = static_cast<int>(layout(n0 + m, k0 + kk, 0) - base);
      out[o >> 3] |= code << (4 * (o & 7));  // CUTLASS: element o at bits 4 (o % 8) of word o / 8
    }
  }
  uint4* d = reinterpret_cast<uint4*>(dst + (base >> 1));
#pragma unroll
  for (int i = 0; i < 8; ++i) d[i] = make_uint4(out[4 * i], out[4 * i + 1], out[4 * i + 2], out[4 * i + 3]);
}

}  // namespace

const char* nf4_repack(const void* src, void* dst, int n, int k, cudaStream_t stream) {
  if (n % 16 != 0 || k % 64 != 0) return "nf4_repack needs n % 16 == 0 and k % 64 == 0";
  const int64_t atoms = static_cast<int64_t>(n / 16) * (k / 16);
  constexpr int kThreads = 128;
  const int64_t blocks = (atoms + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff) return "nf4_repack: weight too large";
  if (blocks == 0) return nullptr;
  nf4_repack_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), n, k, nf4_gemm_detail::shuffled_layout(n, k));
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace lora_fused::sm90
