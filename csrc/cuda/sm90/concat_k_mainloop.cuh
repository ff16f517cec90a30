// A CUTLASS 3 sm90 mainloop (TMA + wgmma, warp-specialised) whose K loop runs over two operand
// pairs in turn: D = A1·B1ᵀ + A2·B2ᵀ, one GEMM over the concatenated K = [K1 | K2] without ever
// materialising the concatenation. For a LoRA layer: [x | s·x·Aᵀ]·[W | B]ᵀ (forward) and
// [dY | s·dY·B]·[W ; A] (the input gradient).
//
// It wraps CUTLASS's MainloopSm90TmaGmmaWarpSpecialized collective (`Base`): the consumer warps
// (wgmma over shared-memory tiles) are Base's, unchanged; only the producer differs. It issues
// ceil(K1/BK) k-tiles from the first pair's TMA descriptors, then ceil(K2/BK) from the second's.
// Each descriptor knows its own K, so TMA zero-fills the last partial k-tile of each pair and the
// padding adds exactly nothing to the accumulator. The kernel is told K = BK·(tiles1 + tiles2), so
// its schedulers run that many k-tiles per output tile.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>

namespace lora_fused::sm90 {

template <class Base>
struct ConcatKMainloop : Base {
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::GmemTiledCopyA;
  using typename Base::GmemTiledCopyB;
  using typename Base::DispatchPolicy;
  using typename Base::TileShape;
  static constexpr int kBlockK = cute::size<2>(TileShape{});

  struct Arguments {
    typename Base::Arguments first;   // A1 [M, K1], B1 [N, K1]
    typename Base::Arguments second;  // A2 [M, K2], B2 [N, K2]
    int k1 = 0;
    int k2 = 0;
  };

  struct Params {
    typename Base::Params first;
    typename Base::Params second;
    int k1 = 0;
    int k2 = 0;
    int k_tiles_first = 0;
    uint32_t tma_transaction_bytes = Base::TmaTransactionBytes;  // read by the kernel for its pipeline
  };

  // The K the kernel is launched with: whole k-tiles of each pair.
  static int concat_k(int k1, int k2) { return kBlockK * (cute::ceil_div(k1, kBlockK) + cute::ceil_div(k2, kBlockK)); }

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args, void* workspace) {
    auto [M, N, K, L] = cute::append<4>(problem_shape, 1);
    (void)K;
    Params p;
    p.first = Base::to_underlying_arguments(cute::make_shape(M, N, args.k1, L), args.first, workspace);
    p.second = Base::to_underlying_arguments(cute::make_shape(M, N, args.k2, L), args.second, workspace);
    p.k1 = args.k1;
    p.k2 = args.k2;
    p.k_tiles_first = cute::ceil_div(args.k1, kBlockK);
    return p;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, K, L] = cute::append<4>(problem_shape, 1);
    return args.k1 >= 1 && args.k2 >= 1 && int(K) == concat_k(args.k1, args.k2) &&
           Base::can_implement(cute::make_shape(M, N, args.k1, L), args.first) &&
           Base::can_implement(cute::make_shape(M, N, args.k2, L), args.second);
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& p) {
    Base::prefetch_tma_descriptors(p.first);
    Base::prefetch_tma_descriptors(p.second);
  }

  // (gA1, gB1, gA2, gB2): the kernel takes tile counts in M and N from the first two.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& p) const {
    auto [M, N, K, L] = problem_shape_MNKL;
    (void)K;
    auto first = Base::load_init(cute::make_shape(M, N, p.k1, L), p.first);
    auto second = Base::load_init(cute::make_shape(M, N, p.k2, L), p.second);
    return cute::make_tuple(cute::get<0>(first), cute::get<1>(first), cute::get<0>(second), cute::get<1>(second));
  }

  // Producer: one elected thread issues the TMA loads of each k-tile into the next free stage.
  template <class TensorA, class TensorB, class TensorA2, class TensorB2, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& p, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB, TensorA2, TensorB2> const& load_inputs,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count, int thread_idx,
                           uint32_t block_rank_in_cluster, TensorStorage& shared_tensors) {
    using namespace cute;
    (void)thread_idx;
    if (!cute::elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});

    constexpr uint32_t cluster_shape_x = get<0>(typename DispatchPolicy::ClusterShape());
    const uint2 cluster_id = {block_rank_in_cluster % cluster_shape_x, block_rank_in_cluster / cluster_shape_x};
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    (void)k_coord;

    // The same partitioning for both pairs (their descriptors differ only in base, strides and K).
    auto tma_a1 = p.first.tma_load_a.get_slice(cluster_id.y);
    auto tma_b1 = p.first.tma_load_b.get_slice(cluster_id.x);
    auto tma_a2 = p.second.tma_load_a.get_slice(cluster_id.y);
    auto tma_b2 = p.second.tma_load_b.get_slice(cluster_id.x);
    Tensor tAgA1 = tma_a1.partition_S(get<0>(load_inputs)(_, _, m_coord, _, l_coord));  // (TMA,TMA_M,TMA_K,k)
    Tensor tBgB1 = tma_b1.partition_S(get<1>(load_inputs)(_, _, n_coord, _, l_coord));
    Tensor tAgA2 = tma_a2.partition_S(get<2>(load_inputs)(_, _, m_coord, _, l_coord));
    Tensor tBgB2 = tma_b2.partition_S(get<3>(load_inputs)(_, _, n_coord, _, l_coord));
    Tensor tAsA = tma_a1.partition_D(sA);  // (TMA,TMA_M,TMA_K,PIPE)
    Tensor tBsB = tma_b1.partition_D(sB);

    uint16_t mcast_mask_a = 0, mcast_mask_b = 0;
    if constexpr (cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<typename DispatchPolicy::ClusterShape>{};
      for (int n = 0; n < size<1>(block_layout); ++n) mcast_mask_a |= uint16_t(1) << block_layout(cluster_id.x, n, Int<0>{});
    }
    if constexpr (cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<typename DispatchPolicy::ClusterShape>{};
      for (int m = 0; m < size<0>(block_layout); ++m) mcast_mask_b |= uint16_t(1) << block_layout(m, cluster_id.y, Int<0>{});
    }

    int k_tile = *k_tile_iter;  // 0 for the data-parallel persistent schedulers used here
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count, ++k_tile) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* tma_barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      if (k_tile < p.k_tiles_first) {
        copy(p.first.tma_load_a.with(*tma_barrier, mcast_mask_a), tAgA1(_, _, _, k_tile), tAsA(_, _, _, stage));
        copy(p.first.tma_load_b.with(*tma_barrier, mcast_mask_b), tBgB1(_, _, _, k_tile), tBsB(_, _, _, stage));
      } else {
        const int k2 = k_tile - p.k_tiles_first;
        copy(p.second.tma_load_a.with(*tma_barrier, mcast_mask_a), tAgA2(_, _, _, k2), tAsA(_, _, _, stage));
        copy(p.second.tma_load_b.with(*tma_barrier, mcast_mask_b), tBgB2(_, _, _, k2), tBsB(_, _, _, stage));
      }
      ++smem_pipe_write;
    }
  }

  // Consumer: Base's wgmma loop, which never looks at where a stage's tiles came from.
  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum, int k_tile_count,
                          int thread_idx, TensorStorage& shared_tensors, Params const& p) {
    Base::mma(pipeline, smem_pipe_read, accum, k_tile_count, thread_idx, shared_tensors, p.first);
  }
};

}  // namespace lora_fused::sm90
