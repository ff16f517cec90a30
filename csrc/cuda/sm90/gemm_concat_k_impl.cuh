// The CUTLASS types behind gemm_concat_k.cuh's declarations; included by one small .cu per
// instantiation (dtype x layout of B), never by other files: it is what makes those files slow to
// compile (~1 min and ~3.5 GB each).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include <type_traits>

#include "cuda/sm90/concat_k_mainloop.cuh"
#include "cuda/sm90/gemm_concat_k.cuh"

namespace lora_fused::sm90 {

template <class T, bool kBKMajor, class TileShape_ = cute::Shape<cute::_128, cute::_256, cute::_64>,
          class ClusterShape_ = cute::Shape<cute::_2, cute::_1, cute::_1>,
          class KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative,
          class EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative>
struct GemmConcatK {
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;
  using LayoutA = cutlass::layout::RowMajor;
  // ColumnMajor B of shape [K, N] is [N, K] row-major: unit stride along K.
  using LayoutB = std::conditional_t<kBKMajor, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = 8;  // 16 bytes of a 16-bit type: TMA's unit

  using FusionOp = cutlass::epilogue::fusion::LinCombPerColBias<T, float, T, void, float>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, kAlign, T, LayoutD, kAlign,
      EpilogueSchedule, FusionOp>::CollectiveOp;
  using BaseMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, LayoutA, kAlign, T, LayoutB, kAlign, float, TileShape,
      ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Mainloop = ConcatKMainloop<BaseMainloop>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static auto stride_a(int64_t ld) { return typename Kernel::StrideA{ld, cute::Int<1>{}, int64_t(0)}; }
  static auto stride_b(int64_t ld) {
    if constexpr (kBKMajor) {
      return typename Kernel::StrideB{ld, cute::Int<1>{}, int64_t(0)};
    } else {
      return typename Kernel::StrideB{cute::Int<1>{}, ld, int64_t(0)};
    }
  }

  static typename Gemm::Arguments arguments(const ConcatKProblem& p) {
    using Main = typename BaseMainloop::Arguments;
    typename Mainloop::Arguments mainloop{
        Main{static_cast<const T*>(p.a1), stride_a(p.lda1), static_cast<const T*>(p.b1), stride_b(p.ldb1)},
        Main{static_cast<const T*>(p.a2), stride_a(p.lda2), static_cast<const T*>(p.b2), stride_b(p.ldb2)},
        p.k1, p.k2};
    typename Epilogue::Arguments epilogue{};
    epilogue.thread.alpha = 1.0f;
    epilogue.thread.beta = 0.0f;
    epilogue.thread.bias_ptr = static_cast<const T*>(p.bias);
    epilogue.ptr_C = nullptr;
    epilogue.dC = typename Kernel::StrideC{int64_t(p.n), cute::Int<1>{}, int64_t(0)};
    epilogue.ptr_D = static_cast<T*>(p.d);
    epilogue.dD = typename Kernel::StrideD{int64_t(p.n), cute::Int<1>{}, int64_t(0)};
    cutlass::KernelHardwareInfo hw;
    hw.sm_count = p.sm_count;
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                  {p.m, p.n, Mainloop::concat_k(p.k1, p.k2), 1},
                                  mainloop,
                                  epilogue,
                                  hw};
    using Raster = cutlass::gemm::kernel::detail::RasterOrderOptions;
    args.scheduler.max_swizzle_size = p.swizzle;
    args.scheduler.raster_order = p.raster == 1 ? Raster::AlongM : p.raster == 2 ? Raster::AlongN : Raster::Heuristic;
    return args;
  }
};

template <class T, bool kBKMajor>
size_t gemm_concat_k_workspace_bytes(const ConcatKProblem& p) {
  using G = GemmConcatK<T, kBKMajor>;
  return G::Gemm::get_workspace_size(G::arguments(p));
}

template <class T, bool kBKMajor>
bool gemm_concat_k_can_implement(const ConcatKProblem& p) {
  using G = GemmConcatK<T, kBKMajor>;
  // TMA needs 16-byte aligned base addresses as well as strides (can_implement checks strides).
  const void* const pointers[] = {p.a1, p.b1, p.a2, p.b2, p.d};
  for (const void* ptr : pointers) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  }
  if (p.bias != nullptr && reinterpret_cast<uintptr_t>(p.bias) % 16 != 0) return false;
  return G::Gemm::can_implement(G::arguments(p)) == cutlass::Status::kSuccess;
}

template <class T, bool kBKMajor>
const char* gemm_concat_k_run(const ConcatKProblem& p, void* workspace, cudaStream_t stream) {
  using G = GemmConcatK<T, kBKMajor>;
  typename G::Gemm gemm;
  const auto args = G::arguments(p);
  cutlass::Status status = gemm.initialize(args, workspace, stream);
  if (status != cutlass::Status::kSuccess) return cutlass::cutlassGetStatusString(status);
  status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess) return cutlass::cutlassGetStatusString(status);
  return nullptr;
}

#define LORA_FUSED_INSTANTIATE_GEMM_CONCAT_K(T, KMAJOR)                                                  \
  template size_t gemm_concat_k_workspace_bytes<T, KMAJOR>(const ConcatKProblem&);                      \
  template bool gemm_concat_k_can_implement<T, KMAJOR>(const ConcatKProblem&);                          \
  template const char* gemm_concat_k_run<T, KMAJOR>(const ConcatKProblem&, void*, cudaStream_t);

}  // namespace lora_fused::sm90
