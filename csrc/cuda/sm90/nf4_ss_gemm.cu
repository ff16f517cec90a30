// The NF4 x bf16 Hopper GEMM with a decoding warpgroup: the NF4 tiles are decoded by a warpgroup of
// their own into shared memory, so that the MMA warpgroups run plain SS wgmma (both operands from
// shared memory) exactly as a bf16 GEMM does. The CUTLASS mixed-input kernel (nf4_gemm_impl.cuh)
// converts in the MMA warps' registers (RS wgmma) and runs at 1.2-1.3x cuBLAS at 1024-4096 tokens
// (benchmarks/RESULTS.md, sessions 11-12), which is why nf4_linear decodes 16-bit slabs of W from 2048
// tokens: extra memory issue 5 wants gone. This kernel needs no slab, forward or backward, and takes
// the LoRA term as more reduction columns. Host side: nf4_ss_gemm.h; probe: scripts/probe_nf4_ss_gemm/.
//
// Forward: y [M, N] = x [M, K] (bf16) . W^T; backward (kTrans): dX [M, K] = dY [M, N] . W. W [N, K]
// is NF4 in bitsandbytes' packing with one scale per 64 consecutive elements of a row (blocksize
// 64, K % 64 == 0), the scales given as bf16 [K / 64, ld] (nf4_group_scales). Swapped like the
// CUTLASS kernel: the MMA's M is the output features (A, 128 per tile: W's rows forward, its columns
// backward), its N the tokens (B, 256 per tile).
// - A cluster of two CTAs takes two adjacent token tiles of the same 128 features, and so the same
//   W tile: each CTA decodes half of every A k-tile (64 x 64 elements) and sends it to the other by
//   bulk copies (cp.async.bulk shared::cta -> shared::cluster, 2 KiB per decode warp) into the same
//   bytes of its stage, so a W tile is decoded once per 512 tokens. Session 20's ncu sampling (H100) showed why:
//   with each CTA decoding its whole tile, one decode warp per SMSP issues ~1 instruction every 4
//   cycles (a dependent stream of 2-cycle ALU ops) and the MMA warps spent ~70% of their time
//   waiting for its tiles (1.37-1.49x cuBLAS; 1.0x with the decode skipped).
// - Warpgroup 0 (the decode warpgroup): thread 0 issues the TMA loads of the CTA's codes and bf16
//   scales of a k-tile (a 6-slot ring, 4 k-tiles ahead) and of the activation tile [256, 64]. Each
//   thread takes 32 elements (16 bytes of codes, one scale): forward tile row 64 rank + t / 2,
//   columns 32 (t % 2) ...; backward W row kt * 64 + 32 rank + t / 4, tile columns 32 (t % 4) ...;
//   4 x 8 levels by byte_perm (cuda/nf4_levels_bf16.cuh) times the bf16 scale, four 16-byte stores
//   into the 128-byte-swizzled layout wgmma reads (K-major forward, MN-major backward): each warp's
//   2 KiB are contiguous. Then a proxy fence, __syncwarp, and each warp's lane 0 arrives on the local
//   full barrier (expecting the peer warp's 2 KiB) and sends the warp's part (one bulk copy). Rows past N come in as zero codes and
//   scales (TMA's fill) and decode to zeros (backward they are summed); columns past K are never stored.
// - Warpgroups 1-2: 64 output features x 256 tokens each, wgmma m64n256k16 from shared memory,
//   fp32 accumulators; a stage is released, by one arrival per warp on both CTAs' barriers, once the
//   next k-tile's wgmmas are issued: the decode warpgroups refill a stage only after all four MMA
//   warpgroups of the pair are done with it.
// - Epilogue: fp32 (+ bias, forward) -> bf16 through shared memory as [256 tokens][128 features]
//   over the idle B stages, then 16-byte stores along each token's features.
// - Split reduction (Nf4SsProblem::splits > 1, for few output tiles): the grid repeats per split of
//   the k-tiles; each CTA writes its fp32 sums to partials[split] (staged the same way, one
//   warpgroup's 64 features at a time), and nf4_ss_reduce_splits adds them in order (+ bias).
// - With LoRA (kLora), the reduction runs on over the rank as whole k-tiles, one GEMM over [K | r]:
//   forward y = [x | u] [W | B]^T (u = s x A^T, made before), backward dX = [dY | du] [W ; A]
//   (du = s dY B). The decode warpgroups copy their halves of lora_B's rows (forward) or lora_A's
//   rows (backward) into those k-tiles of A (zeros past r), and TMA loads u or du as their B tiles:
//   the LoRA term costs ceil(r / 64) more k-tiles, no pass over the output.
// 4 stages of 16 + 32 KiB. Every thread fits in 168 registers (ptxas, no spills). Logic checked
// without a GPU: scripts/probe_nf4_ss_gemm/check_layouts.cu (shared-memory addresses, the halves)
// and emulate.py (indices, the pair's barrier protocol). Probe flags (nf4_ss_gemm.h) skip the decode
// or the output stores, to time what is left.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>

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
constexpr int kCluster = 2;                        // CTAs sharing a W tile (adjacent token tiles)
constexpr int kHalfBytes = kBM * kBK * 2 / kCluster;  // the part of a decoded A stage each CTA makes: 8 KiB
constexpr int kWarpBytes = kHalfBytes / 4;             // and each of its decode warps: 2 KiB
constexpr int kWStages = 6;                        // the ring of NF4 code and scale tiles
constexpr int kLookahead = 4;                      // code tiles are loaded this many k-tiles ahead of their decode
constexpr int kCodeBytes = kBM * kBK / 2 / kCluster;  // a CTA's codes per k-tile: 2 KiB
constexpr int kScaleCount = kBM * kBK / 64 / kCluster;  // and its bf16 scales: 64
constexpr int kMaxSplits = 4;                      // nf4_ss_gemm_splits' choice at most

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
// A CTA's codes per k-tile as TMA boxes of the packed bytes [n, k / 2]: forward 64 W rows x 32 bytes
// (its half of the tile's 128 rows), backward 32 W rows x 64 bytes (its half of the k-tile's 64).
// Either way decode thread t's 16 bytes (half a quantization block) start at byte 16 t.
template <bool kTrans>
using CodesBox = cute::conditional_t<kTrans, Shape<_32, _64>, Shape<_64, _32>>;
template <bool kTrans>
using SmemLayoutCodes = cute::conditional_t<kTrans, Layout<Shape<_32, _64, Int<kWStages>>, Stride<_64, _1, Int<kCodeBytes>>>,
                                            Layout<Shape<_64, _32, Int<kWStages>>, Stride<_32, _1, Int<kCodeBytes>>>>;
// Their scales as boxes of the bf16 scales [k / 64, n]: forward group kt of 64 rows, backward 2 groups
// (the tile's 128 columns) of 32 rows.
template <bool kTrans>
using ScalesBox = cute::conditional_t<kTrans, Shape<_2, _32>, Shape<_1, _64>>;
template <bool kTrans>
using SmemLayoutScales = cute::conditional_t<kTrans, Layout<Shape<_2, _32, Int<kWStages>>, Stride<_32, _1, Int<kScaleCount>>>,
                                             Layout<Shape<_1, _64, Int<kWStages>>, Stride<_64, _1, Int<kScaleCount>>>>;

struct SharedStorage {
  alignas(1024) cute::ArrayEngine<T, kBM * kBK * kStages> a;
  alignas(1024) cute::ArrayEngine<T, cosize_v<SmemLayoutB>> b;
  alignas(128) cute::ArrayEngine<uint8_t, kCodeBytes * kWStages> codes;
  alignas(128) cute::ArrayEngine<T, kScaleCount * kWStages> scales;
  uint64_t full_a[kStages];    // the 4 local decode warps (one arrival each) + the peer's half (kHalfBytes)
  uint64_t full_b[kStages];    // the activation tile's TMA bytes
  uint64_t empty[kStages];     // every MMA warp of both CTAs (16 arrivals)
  uint64_t w_full[kWStages];   // a code tile's and its scales' TMA bytes
  uint64_t w_empty[kWStages];  // its 128 decoding threads have read them
  uint32_t level_tables[4];    // Nf4LevelTables::store
};

using Barrier = cutlass::arch::ClusterBarrier;
using TxBarrier = cutlass::arch::ClusterTransactionBarrier;

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// The same shared-memory address in CTA `rank` of the cluster.
__device__ __forceinline__ uint32_t peer_addr(uint32_t addr, uint32_t rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(out) : "r"(addr), "r"(rank));
  return out;
}

// m tokens; n, k: W's shape [n, k]. Output features: n forward, k backward. LoRA (kLora): lora_w is
// lora_B [n, r] forward, lora_A [r, k] backward; tma_u loads u / du [m, r]. tma_c and tma_s load W's
// codes and scales.
template <bool kTrans, bool kLora, class TmaB, class TmaU, class TmaC, class TmaS>
__global__ void __launch_bounds__(kThreads, 1)
    nf4_ss_gemm_kernel(int m, int n, int k, CUTE_GRID_CONSTANT TmaC const tma_c, CUTE_GRID_CONSTANT TmaS const tma_s,
                       CUTE_GRID_CONSTANT TmaB const tma_b, const __nv_bfloat16* __restrict__ lora_w, int r,
                       CUTE_GRID_CONSTANT TmaU const tma_u, const __nv_bfloat16* __restrict__ bias,
                       __nv_bfloat16* __restrict__ y, int splits, float* __restrict__ partials, int probe_flags) {
  extern __shared__ __align__(1024) char smem_raw[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);
  Tensor sA = make_tensor(make_smem_ptr(ss.a.begin()), SmemLayoutA<kTrans>{});  // (kBM, kBK, kStages)
  Tensor sB = make_tensor(make_smem_ptr(ss.b.begin()), SmemLayoutB{});  // (kBN, kBK, kStages)
  const int features = kTrans ? k : n, reduction = kTrans ? n : k;
  // A cluster of two CTAs per W tile, features fastest, then token pairs, then splits of the reduction:
  // CTA `rank` takes token tile 2 (pair / tiles_f) + rank.
  const int tiles_f = (features + kBM - 1) / kBM;
  const int pairs = tiles_f * (((m + kBN - 1) / kBN + kCluster - 1) / kCluster);
  const uint32_t rank = cute::block_rank_in_cluster(), peer = rank ^ 1;
  const int split = static_cast<int>(blockIdx.x / kCluster) / pairs, pair = static_cast<int>(blockIdx.x / kCluster) % pairs;
  const int tile_f = pair % tiles_f, tile_m = kCluster * (pair / tiles_f) + static_cast<int>(rank);
  const int k_tiles_w = (reduction + kBK - 1) / kBK;
  // This CTA's k-tiles: split `split` of W's (at least one each: splits <= k_tiles_w), the last split
  // also the LoRA k-tiles. The rings below count `count` k-tiles from 0 (i); kt is the k-tile itself.
  const int kt_begin = split * k_tiles_w / splits;
  const int kt_end = split == splits - 1 ? k_tiles_w + (kLora ? (r + kBK - 1) / kBK : 0) : (split + 1) * k_tiles_w / splits;
  const int count = kt_end - kt_begin;
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    // The swizzle formulas below (and TMA's 128-byte swizzle) assume 1 KiB-aligned tiles.
    if (smem_addr(smem_raw) % 1024 != 0) __trap();
    for (int s = 0; s < kStages; ++s) {
      TxBarrier::init(&ss.full_a[s], 4);
      TxBarrier::init(&ss.full_b[s], 1);
      Barrier::init(&ss.empty[s], 8 * kCluster);
    }
    for (int s = 0; s < kWStages; ++s) {
      TxBarrier::init(&ss.w_full[s], 1);
      Barrier::init(&ss.w_empty[s], 128);
    }
    cutlass::arch::fence_barrier_init();
    lora_fused::cuda::Nf4LevelTables::store(ss.level_tables);
  }
  cute::cluster_sync();  // the peer's barriers are initialized before anyone arrives on them

  if (wg == 0) {
    const int t = threadIdx.x;
    Tensor mB = tma_b.get_tma_tensor(make_shape(m, reduction));
    Tensor mU = tma_u.get_tma_tensor(make_shape(m, kLora ? r : reduction));
    Tensor mC = tma_c.get_tma_tensor(make_shape(n, k / 2));
    Tensor mS = tma_s.get_tma_tensor(make_shape(k / kBK, n));
    Tensor sC = make_tensor(make_smem_ptr(ss.codes.begin()), SmemLayoutCodes<kTrans>{});
    Tensor sS = make_tensor(make_smem_ptr(ss.scales.begin()), SmemLayoutScales<kTrans>{});
    Tensor gC = local_tile(mC, CodesBox<kTrans>{}, make_coord(_, _));  // (box, box, rows / box, cols / box)
    Tensor gS = local_tile(mS, ScalesBox<kTrans>{}, make_coord(_, _));
    auto [tCgC, tCsC] = tma_partition(tma_c, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sC), group_modes<0, 2>(gC));
    auto [tSgS, tSsS] = tma_partition(tma_s, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sS), group_modes<0, 2>(gS));
    // An odd last token tile leaves its pair's second CTA past the tokens: it loads the last tile
    // again (and stores nothing) rather than a box wholly outside the tensor.
    const int load_m = min(tile_m, (m + kBN - 1) / kBN - 1);
    Tensor gB = local_tile(mB, make_shape(Int<kBN>{}, Int<kBK>{}), make_coord(load_m, _));  // (kBN, kBK, k_tiles)
    auto [tBgB, tBsB] = tma_partition(tma_b, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sB), group_modes<0, 2>(gB));
    Tensor gU = local_tile(mU, make_shape(Int<kBN>{}, Int<kBK>{}), make_coord(load_m, _));  // (kBN, kBK, rank tiles)
    auto [tUgU, tUsU] = tma_partition(tma_u, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sB), group_modes<0, 2>(gU));
    constexpr uint32_t kTmaBytes = kBN * kBK * sizeof(T);
    constexpr uint32_t kWBytes = kCodeBytes + kScaleCount * sizeof(T);
    const int half = static_cast<int>(rank);
    // Issues the TMA loads of this CTA's codes and scales of its i-th k-tile (a LoRA k-tile has none: a
    // bare arrive keeps the ring's phases), once its ring slot's last readers are done.
    const auto issue_w = [&](int i) {
      if (i >= count) return;
      const int kt = kt_begin + i, ws = i % kWStages;
      Barrier::wait(&ss.w_empty[ws], ((i / kWStages) & 1) ^ 1);  // a fresh barrier passes parity 1 at once
      if (kt < k_tiles_w) {
        TxBarrier::arrive_and_expect_tx(&ss.w_full[ws], kWBytes);
        copy(tma_c.with(ss.w_full[ws]), kTrans ? tCgC(_, 2 * kt + half, tile_f) : tCgC(_, 2 * tile_f + half, kt), tCsC(_, ws));
        copy(tma_s.with(ss.w_full[ws]), kTrans ? tSgS(_, tile_f, 2 * kt + half) : tSgS(_, kt, 2 * tile_f + half), tSsS(_, ws));
      } else {
        Barrier::arrive(&ss.w_full[ws]);
      }
    };
    if (t == 0) {
      for (int i = 0; i < kLookahead; ++i) issue_w(i);
    }
    // This thread's 32 elements of the A tile: forward tile row i = 64 rank + t / 2, columns
    // 32 (t % 2) ...; backward tile column (reduction index) j = 32 rank + t / 4, rows i0 = 32 (t % 4)
    // ... The byte address of its 16-byte chunk q (0-3) in stage 0 is base + 16 ((4 (t % 2) + q) ^ key)
    // either way, from the element offsets SmemLayoutA gives (checked on the host for every element
    // of both layouts; 8192 more per stage):
    // K-major, element (row i, column j): 512 (i / 8) + 64 (i % 8) + 8 ((j / 8) ^ (i % 8)) + j % 8;
    // MN-major, (i, j): 512 (i / 64) + 1024 (j / 8) + 64 (j % 8) + 8 (((i % 64) / 8) ^ (j % 8)) + i % 8.
    // So rank r's warp w fills bytes 8192 r + 2048 w ... + 2047 of each stage: one copy to the peer.
    const int fi = 64 * half + t / 2, bj = 32 * half + t / 4;  // forward row, backward column
    const uint32_t key = kTrans ? bj % 8 : fi % 8;
    const uint32_t a_base = smem_addr(ss.a.begin()) +
                            (kTrans ? 1024 * ((t % 4) / 2) + 2048 * (bj / 8) + 128 * key : 1024 * (fi / 8) + 128 * key);
    // Its codes (16 bytes at 16 t) and scale in a ring slot.
    const uint8_t* my_codes = ss.codes.begin() + 16 * t;
    const T* my_scale = ss.scales.begin() + (kTrans ? 32 * ((t % 4) / 2) + t / 4 : t / 2);
    const auto tables = lora_fused::cuda::Nf4LevelTables::load(ss.level_tables);
    for (int i = 0; i < count; ++i) {
      const int kt = kt_begin + i, s = i % kStages, ws = i % kWStages;
      const uint32_t phase = (i / kStages) & 1;
      if (t == 0) issue_w(i + kLookahead);
      TxBarrier::wait(&ss.w_full[ws], (i / kWStages) & 1);
      uint4 cw = make_uint4(0, 0, 0, 0);
      __nv_bfloat16 scale = __float2bfloat16_rn(0.f);
      if (kt < k_tiles_w) {
        cw = *reinterpret_cast<const uint4*>(my_codes + ws * kCodeBytes);
        scale = reinterpret_cast<const __nv_bfloat16&>(my_scale[ws * kScaleCount]);
      }
      Barrier::arrive(&ss.w_empty[ws]);
      // Stage s is free in both CTAs: every MMA warp of both has released it.
      Barrier::wait(&ss.empty[s], phase ^ 1);  // a fresh barrier passes parity 1 at once
      if (t == 0) {
        TxBarrier::arrive_and_expect_tx(&ss.full_b[s], kTmaBytes);
        if (!kLora || kt < k_tiles_w) {
          copy(tma_b.with(ss.full_b[s]), tBgB(_, kt), tBsB(_, s));
        } else {
          copy(tma_u.with(ss.full_b[s]), tUgU(_, kt - k_tiles_w), tUsU(_, s));
        }
      }
      const uint32_t stage_base = a_base + s * (kBM * kBK * 2);
      if (kLora && kt >= k_tiles_w) {
        // The LoRA k-tile: this thread's 32 elements of lora_B row tile_f * 128 + fi, ranks j0 + 32 (t % 2)
        // ... (forward), or of lora_A row j0 + bj, the columns of its W elements (backward).
        const int j0 = (kt - k_tiles_w) * kBK;
        const int64_t lr = kTrans ? j0 + bj : static_cast<int64_t>(tile_f) * kBM + fi;
        const int64_t lc = kTrans ? static_cast<int64_t>(tile_f) * kBM + 32 * (t % 4) : j0 + 32 * (t % 2);
        const int64_t rows = kTrans ? r : n, cols = kTrans ? k : r, ld = kTrans ? k : r;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          uint4 v = make_uint4(0, 0, 0, 0);
          if (lr < rows && lc + 8 * q < cols) v = __ldg(reinterpret_cast<const uint4*>(lora_w + lr * ld + lc + 8 * q));
          const uint32_t addr = stage_base + 16 * ((4 * (t % 2) + q) ^ key);
          asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
        }
      } else if (!(probe_flags & Nf4SsProblem::kSkipDecode)) {
        // Rows past N came in as zero codes with zero scales (TMA's fill), so they decode to zeros.
        const __nv_bfloat162 s2 = __bfloat162bfloat162(scale);
        const uint32_t words[4] = {cw.x, cw.y, cw.z, cw.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          uint32_t o[4];
          lora_fused::cuda::nf4_levels8_bf16(words[q], o, tables);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            __nv_bfloat162 v = __hmul2(reinterpret_cast<const __nv_bfloat162&>(o[i]), s2);
            o[i] = reinterpret_cast<const uint32_t&>(v);
          }
          // 8 consecutive W elements of this thread's 32: one 16-byte chunk of the swizzled layout.
          const uint32_t addr = stage_base + 16 * ((4 * (t % 2) + q) ^ key);
          asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(o[0]), "r"(o[1]), "r"(o[2]), "r"(o[3]));
        }
      }
      cutlass::arch::fence_view_async_shared();  // generic-proxy stores -> visible to wgmma and the bulk copy
      __syncwarp();                              // the warp's 2 KiB are written
      if (t % 32 == 0) {
        // Local MMA warps: this warp's arrival, expecting the peer warp's 2 KiB; the peer: ours, by one
        // bulk copy into the same bytes of its stage s, counted on its full_a[s]. Each warp on its own:
        // no wait for the other decode warps.
        TxBarrier::arrive_and_expect_tx(&ss.full_a[s], kWarpBytes);
        const uint32_t src = smem_addr(ss.a.begin()) + s * (kBM * kBK * 2) + kHalfBytes * rank + kWarpBytes * (t / 32);
        asm volatile("cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                         peer_addr(src, peer)),
                     "r"(src), "n"(kWarpBytes), "r"(peer_addr(smem_addr(&ss.full_a[s]), peer))
                     : "memory");
      }
    }
  } else {
    const int mt = threadIdx.x - 128;  // 0 ... 255
    TiledMma<kTrans> mma;
    auto thr = mma.get_thread_slice(mt);
    Tensor tCsA = thr.partition_A(sA);  // (MMA, MMA_M, MMA_K, kStages)
    Tensor tCsB = thr.partition_B(sB);
    Tensor tCrA = thr.make_fragment_A(tCsA);  // descriptors
    Tensor tCrB = thr.make_fragment_B(tCsB);
    Tensor acc = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});  // (MMA, MMA_M, MMA_N) fp32
    Tensor cC = make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{});
    Tensor tCcC = thr.partition_C(cC);  // (weight row, token) of each accumulator
    clear(acc);
    for (int i = 0; i < count; ++i) {
      const int s = i % kStages;
      const uint32_t phase = (i / kStages) & 1;
      TxBarrier::wait(&ss.full_a[s], phase);
      TxBarrier::wait(&ss.full_b[s], phase);
      warpgroup_fence_operand(acc);
      warpgroup_arrive();
      gemm(mma, tCrA(_, _, _, s), tCrB(_, _, _, s), acc);
      warpgroup_commit_batch();
      warpgroup_wait<1>();  // the previous k-tile's wgmmas are done: its stage can be refilled
      warpgroup_fence_operand(acc);
      if (i > 0 && mt % 32 == 0) {  // one arrival per warp, on both CTAs' barriers
        Barrier::arrive(&ss.empty[(i - 1) % kStages]);
        Barrier::arrive(&ss.empty[(i - 1) % kStages], peer, 1);
      }
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc);
    if (partials != nullptr && !(probe_flags & Nf4SsProblem::kSkipStores)) {
      // Split reduction: this split's fp32 sums into partials[split] ([m, features]), staged over the B
      // stages like the bf16 epilogue below, one warpgroup's 64 features at a time (the whole fp32 tile
      // would not fit): rows of 68 floats, so a quad's 4 token pairs land 8 banks apart. The reduce
      // kernel adds the splits (and the bias).
      constexpr int kHalf = kBM / 2, kLdF = kHalf + 4;
      static_assert(kBN * kLdF * 4 <= kBN * kBK * kStages * 2, "fp32 staging fits the B stages");
      const int64_t m0 = static_cast<int64_t>(tile_m) * kBN;
      float* stage = reinterpret_cast<float*>(ss.b.begin());
      float* part = partials + static_cast<int64_t>(split) * m * features;
      const bool vec = features % 4 == 0 && reinterpret_cast<uintptr_t>(partials) % 16 == 0;
      for (int h = 0; h < 2; ++h) {
        asm volatile("bar.sync 1, 256;\n" ::: "memory");  // past the last wgmma / the previous half's reads
        if (mt / 128 == h) {
          for_each(make_int_sequence<size(acc)>{}, [&](auto i) {
            stage[get<1>(tCcC(i)) * kLdF + get<0>(tCcC(i)) % kHalf] = acc(i);
          });
        }
        asm volatile("bar.sync 1, 256;\n" ::: "memory");
        const int64_t f0 = static_cast<int64_t>(tile_f) * kBM + h * kHalf;
        for (int q = mt; q < kBN * (kHalf / 4); q += 256) {
          const int tl = q / (kHalf / 4), c4 = 4 * (q % (kHalf / 4));
          const int64_t tok = m0 + tl, f = f0 + c4;
          if (tok >= m || f >= features) continue;
          const float* src = stage + tl * kLdF + c4;
          float* dst = part + tok * features + f;
          if (vec) {
            *reinterpret_cast<float4*>(dst) = *reinterpret_cast<const float4*>(src);
          } else {
            for (int e = 0; e < 4 && f + e < features; ++e) dst[e] = src[e];
          }
        }
      }
    } else if (!(probe_flags & Nf4SsProblem::kSkipStores)) {
      // The epilogue through shared memory: the tile as [kBN tokens][kBM features] bf16 over the B
      // stages (idle: every activation tile has landed and been read; not the A stages, which this
      // CTA's last bulk copies to its peers may still be reading: their completion is counted on the
      // peers' barriers only), rows padded to 272 bytes (16-byte aligned; the 4 token pairs of a quad land 8 banks apart), then 16-byte
      // stores along each token's features. Measured 4-7% faster than 2-byte stores straight from the
      // accumulators (session 19), which also pushed this warpgroup past its 168 registers: the
      // compiler hoists their 128 addresses. Both MMA warpgroups must be past their last wgmma (which
      // read these buffers) before anyone writes.
      constexpr int kLd = kBM + 8;
      static_assert(kBN * kLd * 2 <= kBN * kBK * kStages * 2, "staging fits the B stages");
      const int64_t f0 = static_cast<int64_t>(tile_f) * kBM, m0 = static_cast<int64_t>(tile_m) * kBN;
      __nv_bfloat16* stage = reinterpret_cast<__nv_bfloat16*>(ss.b.begin());
      asm volatile("bar.sync 1, 256;\n" ::: "memory");
      for_each(make_int_sequence<size(acc)>{}, [&](auto i) {  // compile-time indices into tCcC
        const int fl = get<0>(tCcC(i)), tl = get<1>(tCcC(i));
        const int64_t f = f0 + fl;
        const float b = bias != nullptr && f < features ? __bfloat162float(bias[f]) : 0.f;
        stage[tl * kLd + fl] = __float2bfloat16_rn(acc(i) + b);
      });
      asm volatile("bar.sync 1, 256;\n" ::: "memory");
      const bool vec = features % 8 == 0 && reinterpret_cast<uintptr_t>(y) % 16 == 0;
      for (int q = mt; q < kBN * (kBM / 8); q += 256) {
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
  // Neither CTA exits while the peer may still arrive on its barriers.
  cute::cluster_sync();
}

// y = bf16(sum of the splits' fp32 partials [splits, m, features] (+ bias)), 4 elements per thread
// where features % 4 == 0 (the partials 16-byte aligned; y's 8-byte stores need y 8-byte aligned).
__global__ void nf4_ss_reduce_splits(const float* __restrict__ partials, int splits, int64_t m, int features,
                                     const __nv_bfloat16* __restrict__ bias, __nv_bfloat16* __restrict__ y) {
  const int64_t count = m * features;
  const bool vec = features % 4 == 0 && reinterpret_cast<uintptr_t>(partials) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(y) % 8 == 0;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (vec) {
    for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < count / 4; q += step) {
      float4 a = reinterpret_cast<const float4*>(partials)[q];
      for (int s = 1; s < splits; ++s) {
        const float4 b = reinterpret_cast<const float4*>(partials + s * count)[q];
        a.x += b.x, a.y += b.y, a.z += b.z, a.w += b.w;
      }
      if (bias != nullptr) {
        const int f = static_cast<int>((4 * q) % features);
        a.x += __bfloat162float(bias[f]), a.y += __bfloat162float(bias[f + 1]);
        a.z += __bfloat162float(bias[f + 2]), a.w += __bfloat162float(bias[f + 3]);
      }
      __nv_bfloat162 lo = __floats2bfloat162_rn(a.x, a.y), hi = __floats2bfloat162_rn(a.z, a.w);
      uint2 o;
      o.x = reinterpret_cast<const uint32_t&>(lo);
      o.y = reinterpret_cast<const uint32_t&>(hi);
      reinterpret_cast<uint2*>(y)[q] = o;
    }
  } else {
    for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < count; q += step) {
      float a = partials[q];
      for (int s = 1; s < splits; ++s) a += partials[s * count + q];
      if (bias != nullptr) a += __bfloat162float(bias[q % features]);
      y[q] = __float2bfloat16_rn(a);
    }
  }
}

auto activation_tma(const void* p, int rows, int cols) {
  Tensor t = make_tensor(make_gmem_ptr(reinterpret_cast<const T*>(p)), make_shape(rows, cols), make_stride(cols, Int<1>{}));
  return make_tma_atom(SM90_TMA_LOAD{}, t, SmemLayoutB{}(_, _, 0), make_shape(Int<kBN>{}, Int<kBK>{}));
}

template <bool kTrans>
auto codes_tma(const uint8_t* packed, int n, int k) {
  Tensor t = make_tensor(make_gmem_ptr(packed), make_shape(n, k / 2), make_stride(static_cast<int64_t>(k / 2), Int<1>{}));
  return make_tma_atom(SM90_TMA_LOAD{}, t, SmemLayoutCodes<kTrans>{}(_, _, 0), CodesBox<kTrans>{});
}

template <bool kTrans>
auto scales_tma(const void* scales, int64_t ld, int n, int k) {
  Tensor t = make_tensor(make_gmem_ptr(reinterpret_cast<const T*>(scales)), make_shape(k / kBK, n), make_stride(ld, Int<1>{}));
  return make_tma_atom(SM90_TMA_LOAD{}, t, SmemLayoutScales<kTrans>{}(_, _, 0), ScalesBox<kTrans>{});
}

template <bool kTrans, bool kLora>
const char* launch(const Nf4SsProblem& p, cudaStream_t stream) {
  const int reduction = kTrans ? p.n : p.k, features = kTrans ? p.k : p.n;
  auto tma_b = activation_tma(p.act, p.m, reduction);
  auto tma_u = kLora ? activation_tma(p.lora_act, p.m, p.r) : tma_b;  // the same type either way
  auto tma_c = codes_tma<kTrans>(p.packed, p.n, p.k);
  auto tma_s = scales_tma<kTrans>(p.scales, p.scales_ld, p.n, p.k);
  auto kernel = nf4_ss_gemm_kernel<kTrans, kLora, decltype(tma_b), decltype(tma_u), decltype(tma_c), decltype(tma_s)>;
  const int smem = static_cast<int>(sizeof(SharedStorage));
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
    return "cudaFuncSetAttribute (dynamic shared memory) failed";
  }
  const int tiles_f = (features + kBM - 1) / kBM, tiles_m = (p.m + kBN - 1) / kBN;
  const int splits = p.splits > 1 ? p.splits : 1;
  cudaLaunchConfig_t cfg{};
  // An odd last token tile: its pair's second CTA decodes, stores nothing.
  cfg.gridDim = dim3(kCluster * tiles_f * ((tiles_m + kCluster - 1) / kCluster) * splits);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = kCluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  const cudaError_t le = cudaLaunchKernelEx(&cfg, kernel, p.m, p.n, p.k, tma_c, tma_s, tma_b,
                                            static_cast<const __nv_bfloat16*>(p.lora_w), p.r, tma_u,
                                            static_cast<const __nv_bfloat16*>(p.bias), static_cast<__nv_bfloat16*>(p.y),
                                            splits, splits > 1 ? p.partials : nullptr, p.probe_flags);
  if (le != cudaSuccess) return cudaGetErrorString(le);
  if (splits > 1 && !(p.probe_flags & Nf4SsProblem::kSkipStores)) {
    const int64_t count = static_cast<int64_t>(p.m) * features;
    const int blocks = static_cast<int>(std::min<int64_t>((count / 4 + 255) / 256 + 1, 4096));
    nf4_ss_reduce_splits<<<blocks, 256, 0, stream>>>(p.partials, splits, p.m, features,
                                                     static_cast<const __nv_bfloat16*>(p.bias),
                                                     static_cast<__nv_bfloat16*>(p.y));
  }
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
  const int k_tiles_w = ((p.trans ? p.n : p.k) + kBK - 1) / kBK;
  if (p.splits < 1 || p.splits > k_tiles_w) return "needs 1 <= splits <= the reduction's 64-column tiles";
  if (p.splits > 1 && p.partials == nullptr) return "needs fp32 partials [splits, m, features] with splits > 1";
  if (p.scales == nullptr || !aligned16(p.scales) || p.scales_ld < p.n || p.scales_ld % 8 != 0) {
    return "needs bf16 scales [k / 64, scales_ld], 16-byte aligned, scales_ld >= n and a multiple of 8";
  }
  return nullptr;
}

int nf4_ss_gemm_splits(const Nf4SsProblem& p, int sm_count) {
  using namespace nf4_ss_detail;
  const int features = p.trans ? p.k : p.n, reduction = p.trans ? p.n : p.k;
  const int64_t pairs = static_cast<int64_t>((features + kBM - 1) / kBM) * (((p.m + kBN - 1) / kBN + kCluster - 1) / kCluster);
  const int64_t slots = std::max(sm_count / kCluster, 1);
  const int64_t k_tiles_w = (reduction + kBK - 1) / kBK;
  // Estimated microseconds on an H100: waves of pairs x k-tiles per pair x ~0.95 us per k-tile (a pair's
  // 128 x 512 x 64 at 4096 tokens: 4096->4096 forward in 244 us = 4 waves x 64 k-tiles, session 22),
  // plus for s > 1 the fp32 partials' round trip (written and read, ~2.5 TB/s). A split must save a
  // tenth and keep >= 8 k-tiles per split (the pipeline's fill).
  const auto cost = [&](int64_t s) {
    const double gemm = 0.95 * static_cast<double>((pairs * s + slots - 1) / slots * ((k_tiles_w + s - 1) / s));
    return gemm + (s > 1 ? 8.0 * s * p.m * features / 2.5e6 : 0.0);
  };
  int best = 1;
  for (int s = 2; s <= kMaxSplits && k_tiles_w / s >= 8; ++s) {
    if (cost(s) < 0.9 * cost(best)) best = s;
  }
  return best;
}

const char* nf4_ss_gemm_run(const Nf4SsProblem& p, cudaStream_t stream) {
  using namespace nf4_ss_detail;
  if (const char* why = nf4_ss_gemm_check(p)) return why;
  if (p.r > 0) return p.trans ? launch<true, true>(p, stream) : launch<false, true>(p, stream);
  return p.trans ? launch<true, false>(p, stream) : launch<false, false>(p, stream);
}

}  // namespace lora_fused::sm90
