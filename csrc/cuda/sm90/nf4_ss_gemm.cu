// The NF4 x bf16 Hopper GEMM with a decoding warpgroup: the NF4 tiles are decoded by a warpgroup of
// their own into shared memory, so that the MMA warpgroups run plain SS wgmma (both operands from
// shared memory) exactly as a bf16 GEMM does. The CUTLASS mixed-input kernel (nf4_gemm_impl.cuh)
// converts in the MMA warps' registers (RS wgmma) and runs at 1.2-1.3x cuBLAS at 1024-4096 tokens
// (benchmarks/RESULTS.md, sessions 11-12), which is why nf4_linear decodes 16-bit slabs of W from 2048
// tokens: extra memory issue 5 wants gone. This kernel needs no slab, forward or backward, and takes
// the LoRA term as more reduction columns. Host side: nf4_ss_gemm.h; probe:
// scripts/probe_nf4_ss_gemm/. On an H100 (session 19) it is correct and runs at 1.28-1.49x cuBLAS: the
// one decoding warpgroup is the bottleneck (1.03-1.10x with the decode skipped), so it is opt-in.
//
// Forward: y [M, N] = x [M, K] (bf16) . W^T; backward (kTrans): dX [M, K] = dY [M, N] . W. W [N, K]
// is NF4 in bitsandbytes' packing with one scale per 64 consecutive elements of a row (blocksize
// 64, K % 64 == 0; fp32 or double-quantized absmax). Swapped like the CUTLASS kernel: the MMA's M is
// the output features (A, 128 per tile: W's rows forward, its columns backward), its N the tokens
// (B, 256 per tile), so a W tile is decoded once per 256 tokens.
// - Warpgroup 0 decodes the A tile, one k-tile (64 along the reduction) at a time.
//   Each thread takes 64 elements of one W row = one quantization block: forward, row t of the tile;
//   backward, W row kt * 64 + t / 2, columns 64 (t % 2) ... of the tile. 32 bytes of codes (loaded
//   two k-tiles ahead), the block's scale, 8 x 8 levels by byte_perm (cuda/nf4_levels_bf16.cuh) times
//   the bf16 scale, eight 16-byte stores into the 128-byte-swizzled layout wgmma reads (K-major
//   forward, MN-major backward: 8 consecutive W columns are contiguous in both); then a proxy fence
//   and an mbarrier arrive. Its thread 0 also issues the TMA load of the activation tile [256, 64].
//   Rows past N decode to zeros (backward they are summed), columns past K are never stored.
// - Warpgroups 1-2: 64 output features x 256 tokens each, wgmma m64n256k16 from shared memory,
//   fp32 accumulators; a stage is released once the next k-tile's wgmmas are issued (the tile's last
//   one after its wgmmas finish).
// - Epilogue: fp32 (+ bias, forward) -> bf16 stores straight from the accumulators (transposed:
//   2-byte stores), or (staged_epilogue) through shared memory as [256 tokens][128 features], then
//   16-byte stores along each token's features.
// - With LoRA (kLora), the reduction runs on over the rank as whole k-tiles, one GEMM over [K | r]:
//   forward y = [x | u] [W | B]^T (u = s x A^T, made before), backward dX = [dY | du] [W ; A]
//   (du = s dY B). The decode warpgroup copies lora_B's rows (forward) or lora_A's rows (backward)
//   into those k-tiles of A (zeros past r), and TMA loads u or du as their B tiles: the LoRA term
//   costs ceil(r / 64) more k-tiles, no pass over the output.
// 4 stages of 16 + 32 KiB. A CTA per output tile, or (persistent) one per SM walking tiles in the
// same order, its producer filling the next tile's stages while the MMA warpgroups store the last
// one. Every thread fits in 168 registers (ptxas, no spills), so no setmaxnreg: a producer above a
// lowered budget would be wrong. Logic checked without a GPU: scripts/probe_nf4_ss_gemm/check_layouts.cu
// (shared-memory addresses) and emulate.py (indices, barrier protocol).
// Probe flags (nf4_ss_gemm.h) skip the decode or the output stores, to time what is left.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "cuda/nf4_levels_bf16.cuh"
#include "cuda/sm90/nf4_ss_gemm.h"

namespace lora_fused::sm90 {
namespace nf4_ss_detail {
using namespace cute;

constexpr int kBM = 128;  // weight rows per tile
constexpr int kBN = 256;  // tokens per tile
constexpr int kBK = 64;   // columns per k-tile = the quantization block
constexpr int kStages = 4;
constexpr int kThreads = 384;

using T = cutlass::bfloat16_t;
// A: forward K-major (W rows are the MMA's M), backward MN-major (W columns are).
template <bool kTrans>
using SmemLayoutA = decltype(tile_to_shape(
    cute::conditional_t<kTrans, GMMA::Layout_MN_SW128_Atom<T>, GMMA::Layout_K_SW128_Atom<T>>{},
    make_shape(Int<kBM>{}, Int<kBK>{}, Int<kStages>{})));
using SmemLayoutB = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, make_shape(Int<kBN>{}, Int<kBK>{}, Int<kStages>{})));
template <bool kTrans>
using TiledMma = decltype(make_tiled_mma(
    SM90_64x256x16_F32BF16BF16_SS<kTrans ? GMMA::Major::MN : GMMA::Major::K, GMMA::Major::K>{}, Layout<Shape<_2, _1, _1>>{}));

struct SharedStorage {
  alignas(1024) cute::ArrayEngine<T, kBM * kBK * kStages> a;
  alignas(1024) cute::ArrayEngine<T, cosize_v<SmemLayoutB>> b;
  alignas(16) float nested_code[256];
  uint64_t full_a[kStages];  // 128 decode threads arrive
  uint64_t full_b[kStages];  // the x tile's TMA bytes
  uint64_t empty[kStages];   // 256 MMA threads arrive
};

// A block's scale: fp32 absmax, or (double quantization, bitsandbytes' rounding: mul then add)
// nested_code[code] * nested_absmax[block / 256] + offset, the code table read from shared memory.
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

// m tokens; n, k: W's shape [n, k]. Output features: n forward, k backward. LoRA (kLora): lora_w is
// lora_B [n, r] forward, lora_A [r, k] backward; tma_u loads u / du [m, r].
template <bool kTrans, bool kLora, class TmaB, class TmaU>
__global__ void __launch_bounds__(kThreads, 1)
    nf4_ss_gemm_kernel(int m, int n, int k, const uint8_t* __restrict__ packed, Scales scales,
                       CUTE_GRID_CONSTANT TmaB const tma_b, const __nv_bfloat16* __restrict__ lora_w, int r,
                       CUTE_GRID_CONSTANT TmaU const tma_u, const __nv_bfloat16* __restrict__ bias,
                       __nv_bfloat16* __restrict__ y, int probe_flags, bool staged) {
  extern __shared__ __align__(1024) char smem_raw[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);
  Tensor sA = make_tensor(make_smem_ptr(ss.a.begin()), SmemLayoutA<kTrans>{});  // (kBM, kBK, kStages)
  Tensor sB = make_tensor(make_smem_ptr(ss.b.begin()), SmemLayoutB{});  // (kBN, kBK, kStages)
  const int features = kTrans ? k : n, reduction = kTrans ? n : k;
  // Tiles in the order a 2-D grid (features fastest) would run them; a CTA takes tiles blockIdx.x,
  // + gridDim.x, ... (one with a full grid, several with a persistent one).
  const int tiles_f = (features + kBM - 1) / kBM, tiles = tiles_f * ((m + kBN - 1) / kBN);
  const int k_tiles_w = (reduction + kBK - 1) / kBK;
  const int k_tiles = k_tiles_w + (kLora ? (r + kBK - 1) / kBK : 0);
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    // The swizzle formulas below (and TMA's 128-byte swizzle) assume 1 KiB-aligned tiles.
    if (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) % 1024 != 0) __trap();
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
    const int t = threadIdx.x;
    Tensor mB = tma_b.get_tma_tensor(make_shape(m, reduction));
    Tensor mU = tma_u.get_tma_tensor(make_shape(m, kLora ? r : reduction));
    constexpr uint32_t kTmaBytes = kBN * kBK * sizeof(T);
    // Byte address of this thread's chunk 0 in stage 0, and the XOR key of its 16-byte chunks: the
    // element offsets SmemLayoutA gives (checked on the host for every element of both layouts):
    // K-major, element (row i, column j): 512 (i / 8) + 64 (i % 8) + 8 ((j / 8) ^ (i % 8)) + j % 8;
    // MN-major, (i, j): 512 (i / 64) + 1024 (j / 8) + 64 (j % 8) + 8 (((i % 64) / 8) ^ (j % 8)) + i % 8;
    // 8192 more per stage.
    const uint32_t key = kTrans ? (t / 2) % 8 : t % 8;
    const uint32_t a_base = static_cast<uint32_t>(__cvta_generic_to_shared(ss.a.begin())) +
                            (kTrans ? 1024 * (t % 2) + 2048 * (t / 16) + 128 * key : 1024 * (t / 8) + 128 * key);
    int it = 0;  // k-tiles issued by this CTA, over all its tiles: the stage and its phase
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int tile_f = tile % tiles_f, tile_m = tile / tiles_f;
      Tensor gB = local_tile(mB, make_shape(Int<kBN>{}, Int<kBK>{}), make_coord(tile_m, _));  // (kBN, kBK, k_tiles)
      auto [tBgB, tBsB] = tma_partition(tma_b, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sB), group_modes<0, 2>(gB));
      Tensor gU = local_tile(mU, make_shape(Int<kBN>{}, Int<kBK>{}), make_coord(tile_m, _));  // (kBN, kBK, rank tiles)
      auto [tUgU, tUsU] = tma_partition(tma_u, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sB), group_modes<0, 2>(gU));
      // This thread's 64 elements of W per k-tile: row `row` (forward fixed, backward + 64 per k-tile),
      // columns col0 ... col0 + 63 (forward + 64 per k-tile, backward fixed). 32 bytes of codes,
      // 32-byte aligned (k % 64 == 0), and one quantization block.
      const int64_t row = kTrans ? t / 2 : static_cast<int64_t>(tile_f) * kBM + t;
      const int64_t col0 = kTrans ? static_cast<int64_t>(tile_f) * kBM + 64 * (t % 2) : 0;
      const int64_t row_step = kTrans ? kBK : 0, col_step = kTrans ? 0 : kBK;
      struct Step {
        uint4 a, b;
        Scales::Parts s;
        bool ok;
      };
      const auto load = [&](int kt) {
        Step st{make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0), {0.f, 0u}, false};
        const int64_t wr = row + row_step * kt, wc = col0 + col_step * kt;
        if (kt < k_tiles_w && wr < n && wc < k) {
          const int64_t e = wr * k + wc;  // first element, a multiple of 64
          const uint4* codes = reinterpret_cast<const uint4*>(packed + e / 2);
          st.a = __ldg(codes);
          st.b = __ldg(codes + 1);
          st.s = scales.load(e / 64);
          st.ok = true;
        }
        return st;
      };
      Step cur = load(0), next = load(1);
      for (int kt = 0; kt < k_tiles; ++kt, ++it) {
        const int s = it % kStages;
        const uint32_t phase = (it / kStages) & 1;
        const Step ahead = load(kt + 2);
        Barrier::wait(&ss.empty[s], phase ^ 1);  // a fresh barrier passes parity 1 at once
        if (t == 0) {
          TxBarrier::arrive_and_expect_tx(&ss.full_b[s], kTmaBytes);
          if (!kLora || kt < k_tiles_w) {
            copy(tma_b.with(ss.full_b[s]), tBgB(_, kt), tBsB(_, s));
          } else {
            copy(tma_u.with(ss.full_b[s]), tUgU(_, kt - k_tiles_w), tUsU(_, s));
          }
        }
        if (kLora && kt >= k_tiles_w) {
          // The LoRA k-tile: this thread's 64 elements of lora_B row tile_f * 128 + t, ranks j0 ...
          // (forward), or of lora_A row j0 + t / 2, the same columns as its W elements (backward).
          const int j0 = (kt - k_tiles_w) * kBK;
          const int64_t lr = kTrans ? j0 + t / 2 : static_cast<int64_t>(tile_f) * kBM + t;
          const int64_t lc = kTrans ? col0 : j0;
          const int64_t rows = kTrans ? r : n, cols = kTrans ? k : r, ld = kTrans ? k : r;
#pragma unroll
          for (int c = 0; c < 8; ++c) {
            uint4 v = make_uint4(0, 0, 0, 0);
            if (lr < rows && lc + 8 * c < cols) v = __ldg(reinterpret_cast<const uint4*>(lora_w + lr * ld + lc + 8 * c));
            const uint32_t addr = a_base + s * (kBM * kBK * 2) + 16 * (c ^ key);
            asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
          }
        } else if (!(probe_flags & Nf4SsProblem::kSkipDecode)) {
          const float scale = cur.ok ? scales.finish(cur.s, ss.nested_code) : 0.f;
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
            // W columns 8c ... 8c + 7 of this thread's 64: one 16-byte chunk of the swizzled layout.
            const uint32_t addr = a_base + s * (kBM * kBK * 2) + 16 * (c ^ key);
            asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(o[0]), "r"(o[1]), "r"(o[2]), "r"(o[3]));
          }
        }
        cutlass::arch::fence_view_async_shared();  // generic-proxy stores -> visible to wgmma
        Barrier::arrive(&ss.full_a[s]);
        cur = next;
        next = ahead;
      }
    }
  } else {
    TiledMma<kTrans> mma;
    auto thr = mma.get_thread_slice(threadIdx.x - 128);
    Tensor tCsA = thr.partition_A(sA);  // (MMA, MMA_M, MMA_K, kStages)
    Tensor tCsB = thr.partition_B(sB);
    Tensor tCrA = thr.make_fragment_A(tCsA);  // descriptors
    Tensor tCrB = thr.make_fragment_B(tCsB);
    Tensor acc = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});  // (MMA, MMA_M, MMA_N) fp32
    Tensor cC = make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{});
    Tensor tCcC = thr.partition_C(cC);  // (weight row, token) of each accumulator
    int it = 0;  // as the producer's
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int tile_f = tile % tiles_f, tile_m = tile / tiles_f;
      clear(acc);
      for (int kt = 0; kt < k_tiles; ++kt, ++it) {
        const int s = it % kStages;
        const uint32_t phase = (it / kStages) & 1;
        Barrier::wait(&ss.full_a[s], phase);
        TxBarrier::wait(&ss.full_b[s], phase);
        warpgroup_fence_operand(acc);
        warpgroup_arrive();
        gemm(mma, tCrA(_, _, _, s), tCrB(_, _, _, s), acc);
        warpgroup_commit_batch();
        warpgroup_wait<1>();  // the previous k-tile's wgmmas are done: its stage can be refilled
        warpgroup_fence_operand(acc);
        if (kt > 0) Barrier::arrive(&ss.empty[(it - 1) % kStages]);
      }
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc);
      Barrier::arrive(&ss.empty[(it - 1) % kStages]);  // the tile's last stage: the next tile may fill it
      const int64_t f0 = static_cast<int64_t>(tile_f) * kBM, m0 = static_cast<int64_t>(tile_m) * kBN;
      if (probe_flags & Nf4SsProblem::kSkipStores) continue;
      if (!staged) {
#pragma unroll
        for (int i = 0; i < size(acc); ++i) {
          const int64_t f = f0 + get<0>(tCcC(i)), tok = m0 + get<1>(tCcC(i));
          if (f < features && tok < m) {
            y[tok * features + f] = __float2bfloat16_rn(bias != nullptr ? acc(i) + __bfloat162float(bias[f]) : acc(i));
          }
        }
        continue;
      }
      // Staged (one tile per CTA: the host never pairs it with a persistent grid, whose producer
      // would be filling these buffers for the next tile): the tile as [kBN tokens][kBM features]
      // bf16 over the idle stage buffers, rows padded to 272 bytes (16-byte aligned; the 4 token
      // pairs of a quad land 8 banks apart). Both MMA warpgroups must be past their last wgmma
      // (which read these buffers) before anyone writes.
      constexpr int kLd = kBM + 8;
      static_assert(kBN * kLd * 2 <= kBM * kBK * kStages * 2 + kBN * kBK * kStages * 2, "staging fits the stages");
      __nv_bfloat16* stage = reinterpret_cast<__nv_bfloat16*>(smem_raw);
      asm volatile("bar.sync 1, 256;\n" ::: "memory");
#pragma unroll
      for (int i = 0; i < size(acc); ++i) {
        const int fl = get<0>(tCcC(i)), tl = get<1>(tCcC(i));
        const int64_t f = f0 + fl;
        const float b = bias != nullptr && f < features ? __bfloat162float(bias[f]) : 0.f;
        stage[tl * kLd + fl] = __float2bfloat16_rn(acc(i) + b);
      }
      asm volatile("bar.sync 1, 256;\n" ::: "memory");
      const bool vec = features % 8 == 0 && reinterpret_cast<uintptr_t>(y) % 16 == 0;
      for (int q = threadIdx.x - 128; q < kBN * (kBM / 8); q += 256) {
        const int tl = q / (kBM / 8), c8 = 8 * (q % (kBM / 8));
        const int64_t tok = m0 + tl, f = f0 + c8;
        if (tok >= m || f >= features) continue;
        const __nv_bfloat16* src = stage + tl * kLd + c8;
        __nv_bfloat16* dst = y + tok * features + f;
        if (vec) {
          *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        } else {
          for (int e = 0; e < 8 && f + e < features; ++e) dst[e] = src[e];
        }
      }
    }
  }
}

auto activation_tma(const void* p, int rows, int cols) {
  Tensor t = make_tensor(make_gmem_ptr(reinterpret_cast<const T*>(p)), make_shape(rows, cols), make_stride(cols, Int<1>{}));
  return make_tma_atom(SM90_TMA_LOAD{}, t, SmemLayoutB{}(_, _, 0), make_shape(Int<kBN>{}, Int<kBK>{}));
}

template <bool kTrans, bool kLora>
const char* launch(const Nf4SsProblem& p, cudaStream_t stream) {
  const int reduction = kTrans ? p.n : p.k, features = kTrans ? p.k : p.n;
  auto tma_b = activation_tma(p.act, p.m, reduction);
  auto tma_u = kLora ? activation_tma(p.lora_act, p.m, p.r) : tma_b;  // the same type either way
  auto kernel = nf4_ss_gemm_kernel<kTrans, kLora, decltype(tma_b), decltype(tma_u)>;
  const int smem = static_cast<int>(sizeof(SharedStorage));
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
    return "cudaFuncSetAttribute (dynamic shared memory) failed";
  }
  const Scales sc{p.absmax, p.codes, p.nested_absmax, p.nested_code, p.offset};
  const int tiles = ((features + kBM - 1) / kBM) * ((p.m + kBN - 1) / kBN);
  int grid = tiles;
  if (p.persistent) {  // one CTA per SM, each walking its tiles
    int dev = 0, sms = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      return "cudaDeviceGetAttribute (SM count) failed";
    }
    grid = sms < tiles ? sms : tiles;
  }
  kernel<<<grid, kThreads, smem, stream>>>(p.m, p.n, p.k, p.packed, sc, tma_b,
                                           static_cast<const __nv_bfloat16*>(p.lora_w), p.r, tma_u,
                                           static_cast<const __nv_bfloat16*>(p.bias), static_cast<__nv_bfloat16*>(p.y),
                                           p.probe_flags, p.staged_epilogue);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

bool aligned16(const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; }

}  // namespace nf4_ss_detail

const char* nf4_ss_gemm_check(const Nf4SsProblem& p) {
  using namespace nf4_ss_detail;
  if (p.m < 1 || p.n < 1 || p.k < 1 || p.k % kBK != 0) return "needs m, n >= 1 and k a positive multiple of 64";
  if (p.trans && p.n % 8 != 0) return "needs n % 8 == 0 backward (dY's rows 16-byte aligned for TMA)";
  if (p.r < 0 || p.r % 8 != 0) return "needs the LoRA rank r % 8 == 0";
  if (!aligned16(p.act) || !aligned16(p.packed) || !aligned16(p.y)) return "needs 16-byte aligned act, packed and y";
  if (p.r > 0 && (!aligned16(p.lora_w) || !aligned16(p.lora_act))) return "needs 16-byte aligned LoRA tensors";
  if (p.trans && p.bias != nullptr) return "takes a bias forward only";
  if (p.persistent && p.staged_epilogue) return "stages its epilogue only with one tile per CTA (not persistent)";
  if (p.absmax == nullptr && (p.codes == nullptr || p.nested_absmax == nullptr || p.nested_code == nullptr)) {
    return "needs absmax, or codes, nested_absmax and nested_code";
  }
  return nullptr;
}

const char* nf4_ss_gemm_run(const Nf4SsProblem& p, cudaStream_t stream) {
  using namespace nf4_ss_detail;
  if (const char* why = nf4_ss_gemm_check(p)) return why;
  if (p.r > 0) return p.trans ? launch<true, true>(p, stream) : launch<false, true>(p, stream);
  return p.trans ? launch<true, false>(p, stream) : launch<false, false>(p, stream);
}

}  // namespace lora_fused::sm90
