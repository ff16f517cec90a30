// Probe: can an NF4 x bf16 GEMM on Hopper run at a bf16 GEMM's speed if the NF4 tiles are decoded
// by a warpgroup of their own into shared memory, so that the MMA warpgroups run plain SS wgmma
// (both operands from shared memory) exactly as a bf16 GEMM does? The CUTLASS mixed-input kernel
// (csrc/cuda/sm90/) converts in the MMA warps' registers (RS wgmma) and runs at 1.2-1.3x cuBLAS at
// 1024-4096 tokens (benchmarks/RESULTS.md, sessions 11-12), which is why nf4_linear decodes 16-bit
// slabs of W from 2048 tokens: extra memory issue 5 wants gone.
//
// y [M, N] = x [M, K] (bf16) . W^T, W [N, K] NF4 in bitsandbytes' packing with one scale per 64
// consecutive elements of a row (blocksize 64, K % 64 == 0; fp32 or double-quantized absmax).
// Swapped like the CUTLASS kernel: the MMA's M is W's rows (A, 128 per tile), its N the tokens
// (B, 256 per tile), so W's tile is decoded once per 256 tokens.
// - Warpgroup 0 (80 registers): thread t decodes row t of the A tile, one k-tile (64 columns = one
//   quantization block) at a time: 32 bytes of codes (loaded two k-tiles ahead), the row's scale,
//   8 x 8 levels by byte_perm (cuda/nf4_levels_bf16.cuh) times the bf16 scale, 16-byte stores into
//   the 128-byte-swizzled K-major layout wgmma reads; then a proxy fence and an mbarrier arrive.
//   Its thread 0 also issues the TMA load of the x tile [256, 64] of the same stage.
// - Warpgroups 1-2 (216 registers): 64 weight rows x 256 tokens each, wgmma m64n256k16 from shared
//   memory, fp32 accumulators; a stage is released once the next k-tile's wgmmas are issued.
// - Epilogue: fp32 -> bf16 stores straight from the accumulators (transposed: 2-byte stores).
// 4 stages of 16 + 32 KiB. Non-persistent grid (N / 128, M / 256).
// `mode` 1 skips the decode (A holds stale data, results are wrong): the cost of decoding.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "cuda/nf4_levels_bf16.cuh"

using namespace cute;

namespace nf4_ss_probe {

constexpr int kBM = 128;  // weight rows per tile
constexpr int kBN = 256;  // tokens per tile
constexpr int kBK = 64;   // columns per k-tile = the quantization block
constexpr int kStages = 4;
constexpr int kThreads = 384;

using T = cutlass::bfloat16_t;
using SmemLayoutA = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, make_shape(Int<kBM>{}, Int<kBK>{}, Int<kStages>{})));
using SmemLayoutB = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, make_shape(Int<kBN>{}, Int<kBK>{}, Int<kStages>{})));
using TiledMma = decltype(make_tiled_mma(SM90_64x256x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>{},
                                         Layout<Shape<_2, _1, _1>>{}));

struct SharedStorage {
  alignas(1024) cute::ArrayEngine<T, cosize_v<SmemLayoutA>> a;
  alignas(1024) cute::ArrayEngine<T, cosize_v<SmemLayoutB>> b;
  alignas(16) float nested_code[256];
  uint64_t full_a[kStages];  // 128 decode threads arrive
  uint64_t full_b[kStages];  // the x tile's TMA bytes
  uint64_t empty[kStages];   // 256 MMA threads arrive
};

// A row's scale for one 64-block: fp32 absmax, or (double quantization, bitsandbytes' rounding: mul
// then add) nested_code[code] * nested_absmax[block / 256] + offset. (Without ATen, so this file
// builds with CUDA and CUTLASS headers alone.)
struct Scales {
  const float* absmax;
  const uint8_t* codes;
  const float* nested_absmax;
  const float* nested_code;
  float offset;
  struct Parts {
    float value;
    uint32_t code;
  };
  __device__ __forceinline__ Parts load(int64_t block) const {
    if (absmax != nullptr) return {__ldg(absmax + block), 0u};
    return {__ldg(nested_absmax + (block >> 8)), __ldg(codes + block)};
  }
  __device__ __forceinline__ float finish(const Parts& p, const float* code_smem) const {
    return absmax != nullptr ? p.value : __fadd_rn(__fmul_rn(code_smem[p.code], p.value), offset);
  }
};

using Barrier = cutlass::arch::ClusterBarrier;
using TxBarrier = cutlass::arch::ClusterTransactionBarrier;

template <class TmaB>
__global__ void __launch_bounds__(kThreads, 1)
    nf4_ss_gemm_kernel(int m, int n, int k, const uint8_t* __restrict__ packed, Scales scales,
                       CUTE_GRID_CONSTANT TmaB const tma_b, __nv_bfloat16* __restrict__ y, int mode) {
  extern __shared__ __align__(1024) char smem_raw[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);
  Tensor sA = make_tensor(make_smem_ptr(ss.a.begin()), SmemLayoutA{});  // (kBM, kBK, kStages)
  Tensor sB = make_tensor(make_smem_ptr(ss.b.begin()), SmemLayoutB{});  // (kBN, kBK, kStages)
  const int tile_n = blockIdx.x, tile_m = blockIdx.y;
  const int k_tiles = k / kBK;
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      Barrier::init(&ss.full_a[s], 128);
      TxBarrier::init(&ss.full_b[s], 1);
      Barrier::init(&ss.empty[s], 256);
    }
    cutlass::arch::fence_barrier_init();
  }
  if (scales.absmax == nullptr) {
    for (int i = threadIdx.x; i < 256; i += kThreads) ss.nested_code[i] = scales.nested_code[i];
  }
  __syncthreads();

  if (wg == 0) {
    cutlass::arch::warpgroup_reg_dealloc<80>();
    const int t = threadIdx.x;
    const int64_t row = static_cast<int64_t>(tile_n) * kBM + t;
    const bool row_ok = row < n;
    Tensor mB = tma_b.get_tma_tensor(make_shape(m, k));
    Tensor gB = local_tile(mB, make_shape(Int<kBN>{}, Int<kBK>{}), make_coord(tile_m, _));  // (kBN, kBK, k_tiles)
    auto [tBgB, tBsB] = tma_partition(tma_b, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sB), group_modes<0, 2>(gB));
    constexpr uint32_t kTmaBytes = kBN * kBK * sizeof(T);
    // Row `row`'s codes: 32 bytes per k-tile (k % 64 == 0, so 32-byte aligned); rows past N decode zeros.
    const uint4* codes = reinterpret_cast<const uint4*>(packed + (row_ok ? row * (k / 2) : 0));
    const int64_t block0 = row_ok ? row * (k / kBK) : 0;
    struct Step {
      uint4 a, b;
      Scales::Parts s;
    };
    const auto load = [&](int kt) {
      Step st{make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0), {0.f, 0u}};
      if (row_ok && kt < k_tiles) {
        st.a = __ldg(codes + 2 * kt);
        st.b = __ldg(codes + 2 * kt + 1);
        st.s = scales.load(block0 + kt);
      }
      return st;
    };
    const uint32_t a_row = static_cast<uint32_t>(__cvta_generic_to_shared(ss.a.begin())) + 1024 * (t / 8) + 128 * (t % 8);
    Step cur = load(0), next = load(1);
    for (int kt = 0; kt < k_tiles; ++kt) {
      const int s = kt % kStages;
      const uint32_t phase = (kt / kStages) & 1;
      const Step ahead = load(kt + 2);
      Barrier::wait(&ss.empty[s], phase ^ 1);  // a fresh barrier passes parity 1 at once
      if (t == 0) {
        TxBarrier::arrive_and_expect_tx(&ss.full_b[s], kTmaBytes);
        copy(tma_b.with(ss.full_b[s]), tBgB(_, kt), tBsB(_, s));
      }
      if (mode != 1) {
        const float scale = row_ok ? scales.finish(cur.s, ss.nested_code) : 0.f;
        const __nv_bfloat162 s2 = __float2bfloat162_rn(scale);
        const uint32_t words[8] = {cur.a.x, cur.a.y, cur.a.z, cur.a.w, cur.b.x, cur.b.y, cur.b.z, cur.b.w};
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          uint32_t o[4];
          lora_fused::cuda::nf4_levels8_bf16(words[c], o);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            __nv_bfloat162 v = __hmul2(reinterpret_cast<const __nv_bfloat162&>(o[i]), s2);
            o[i] = reinterpret_cast<const uint32_t&>(v);
          }
          // Columns 8c..8c+7 of the row: one 16-byte chunk of the 128-byte swizzle (chunk c of row t
          // at chunk c ^ (t % 8); rows 128 bytes apart; 8-row atoms of 1 KiB): the element offset
          // 8192 s + 512 (t / 8) + 64 (t % 8) + 8 (c ^ (t % 8)) that SmemLayoutA gives (checked on
          // the host for every row, chunk and stage). st.shared: a generic store costs more.
          const uint32_t addr = a_row + s * (kBM * kBK * 2) + 16 * (c ^ (t & 7));
          asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(o[0]), "r"(o[1]), "r"(o[2]), "r"(o[3]));
        }
      }
      cutlass::arch::fence_view_async_shared();  // generic-proxy stores -> visible to wgmma
      Barrier::arrive(&ss.full_a[s]);
      cur = next;
      next = ahead;
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<216>();
    TiledMma mma;
    auto thr = mma.get_thread_slice(threadIdx.x - 128);
    Tensor tCsA = thr.partition_A(sA);  // (MMA, MMA_M, MMA_K, kStages)
    Tensor tCsB = thr.partition_B(sB);
    Tensor tCrA = thr.make_fragment_A(tCsA);  // descriptors
    Tensor tCrB = thr.make_fragment_B(tCsB);
    Tensor acc = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});  // (MMA, MMA_M, MMA_N) fp32
    clear(acc);
    for (int kt = 0; kt < k_tiles; ++kt) {
      const int s = kt % kStages;
      const uint32_t phase = (kt / kStages) & 1;
      Barrier::wait(&ss.full_a[s], phase);
      TxBarrier::wait(&ss.full_b[s], phase);
      warpgroup_fence_operand(acc);
      warpgroup_arrive();
      gemm(mma, tCrA(_, _, _, s), tCrB(_, _, _, s), acc);
      warpgroup_commit_batch();
      warpgroup_wait<1>();  // k-tile kt - 1's wgmmas are done: its stage can be refilled
      warpgroup_fence_operand(acc);
      if (kt > 0) Barrier::arrive(&ss.empty[(kt - 1) % kStages]);
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc);
    Tensor cC = make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{});
    Tensor tCcC = thr.partition_C(cC);  // (weight row, token) of each accumulator
    const int64_t n0 = static_cast<int64_t>(tile_n) * kBM, m0 = static_cast<int64_t>(tile_m) * kBN;
#pragma unroll
    for (int i = 0; i < size(acc); ++i) {
      const int64_t r = n0 + get<0>(tCcC(i)), tok = m0 + get<1>(tCcC(i));
      if (r < n && tok < m) y[tok * n + r] = __float2bfloat16_rn(acc(i));
    }
  }
}

}  // namespace nf4_ss_probe
using namespace nf4_ss_probe;

// y = x . dequant(W)^T; absmax (fp32, one per 64-block) or, when it is null, codes / nested_absmax /
// nested_code / offset (double quantization, nested blocks of 256). Returns 0, or what failed.
extern "C" int nf4_ss_gemm(int mode, int m, int n, int k, const void* x, const void* packed, const void* absmax,
                           const void* codes, const void* nested_absmax, const void* nested_code, float offset, void* y,
                           void* stream) {
  if (k % kBK != 0 || m < 1 || n < 1) return 1;
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(packed) % 16 != 0) return 2;
  Tensor mX = make_tensor(make_gmem_ptr(reinterpret_cast<const T*>(x)), make_shape(m, k), make_stride(k, Int<1>{}));
  auto tma_b = make_tma_atom(SM90_TMA_LOAD{}, mX, SmemLayoutB{}(_, _, 0), make_shape(Int<kBN>{}, Int<kBK>{}));
  const Scales sc{static_cast<const float*>(absmax), static_cast<const uint8_t*>(codes),
                  static_cast<const float*>(nested_absmax), static_cast<const float*>(nested_code), offset};
  auto kernel = nf4_ss_gemm_kernel<decltype(tma_b)>;
  const int smem = static_cast<int>(sizeof(SharedStorage));
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) return 3;
  const dim3 grid((n + kBM - 1) / kBM, (m + kBN - 1) / kBN);
  kernel<<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(
      m, n, k, static_cast<const uint8_t*>(packed), sc, tma_b, static_cast<__nv_bfloat16*>(y), mode);
  return cudaGetLastError() == cudaSuccess ? 0 : 4;
}
