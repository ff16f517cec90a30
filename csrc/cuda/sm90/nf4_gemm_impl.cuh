// The NF4 x bf16 Hopper GEMM (nf4_gemm.cuh) as a template over its tile: CUTLASS 3's sm90
// mixed-input collective with a 4-bit element type of our own (nf4_t), whose conversion to bf16 is a
// byte_perm table lookup. One .cu per tile instantiates it (they compile in parallel).
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>

#include "cuda/nf4_levels_bf16.cuh"
#include "cuda/sm90/nf4_gemm.cuh"

namespace lora_fused {
// An NF4 code (0..15), stored 2 per byte in bitsandbytes' order.
struct nf4_t : cutlass::integer_subbyte<4, false> {
  using Base = cutlass::integer_subbyte<4, false>;
  using Base::Base;
  nf4_t() = default;
};
// An NF4 code in the reordered layout of nf4_repack (nf4_gemm.cuh): CUTLASS's nibble order (element
// at offset o in byte o / 2, the low nibble when o is even).
struct nf4s_t : cutlass::integer_subbyte<4, false> {
  using Base = cutlass::integer_subbyte<4, false>;
  using Base::Base;
  nf4s_t() = default;
};

}  // namespace lora_fused

namespace cutlass {
template <>
struct sizeof_bits<lora_fused::nf4_t> {
  static constexpr int value = 4;
};

// 8 codes (one 32-bit word: bytes 0-3, element 2j in byte j's high nibble) -> 8 bf16 NF4 levels.
template <FloatRoundStyle Round>
struct NumericArrayConverter<bfloat16_t, lora_fused::nf4_t, 8, Round> {
  using result_type = Array<bfloat16_t, 8>;
  using source_type = Array<lora_fused::nf4_t, 8>;
  static constexpr FloatRoundStyle round_style = Round;

  CUTLASS_DEVICE static result_type convert(source_type const& source) {
    const uint32_t w = reinterpret_cast<uint32_t const&>(source);
    result_type out;
    lora_fused::cuda::nf4_levels8_bf16(w, reinterpret_cast<uint32_t(&)[4]>(out));
    return out;
  }
  CUTLASS_DEVICE result_type operator()(source_type const& s) const { return convert(s); }
};

template <int N, FloatRoundStyle Round>
struct NumericArrayConverter<bfloat16_t, lora_fused::nf4_t, N, Round> {
  static_assert(N % 8 == 0, "NF4 converts 8 at a time");
  using result_type = Array<bfloat16_t, N>;
  using source_type = Array<lora_fused::nf4_t, N>;
  static constexpr FloatRoundStyle round_style = Round;
  CUTLASS_DEVICE static result_type convert(source_type const& source) {
    using C8 = NumericArrayConverter<bfloat16_t, lora_fused::nf4_t, 8, Round>;
    result_type out;
    auto const* s8 = reinterpret_cast<typename C8::source_type const*>(&source);
    auto* o8 = reinterpret_cast<typename C8::result_type*>(&out);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N / 8; ++i) o8[i] = C8::convert(s8[i]);
    return out;
  }
  CUTLASS_DEVICE result_type operator()(source_type const& s) const { return convert(s); }
};

template <>
struct sizeof_bits<lora_fused::nf4s_t> {
  static constexpr int value = 4;
};

// The reordered layout's 8 codes of a thread's fragment, one 32-bit word in the value order
// [0,2,4,6,1,3,5,7] (nibble p holds element 2p for p < 4, element 2(p - 4) + 1 after), as the
// collective hands them over for that layout: elements (0,1,2,3) are nibbles (0,4,1,5), (4,5,6,7)
// nibbles (2,6,3,7).
template <>
struct LayoutAwareConvertImpl<lora_fused::nf4s_t, bfloat16_t, cute::Layout<cute::Shape<cute::_2, cute::_4>, cute::Stride<cute::_4, cute::_1>>,
                              cute::Layout<cute::_8>> {
  template <class EngineIn, class EngineOut>
  CUTLASS_DEVICE static void convert(
      cute::Tensor<EngineIn, cute::Layout<cute::Shape<cute::_2, cute::_4>, cute::Stride<cute::_4, cute::_1>>> const& src,
      cute::Tensor<EngineOut, cute::Layout<cute::_8>>& dst) {
    static_assert(cute::is_same_v<lora_fused::nf4s_t, typename EngineIn::value_type> &&
                  cute::is_same_v<bfloat16_t, typename EngineOut::value_type>);
    using Words = cutlass::AlignedArray<uint32_t, 4, 16>;
    const uint32_t w = cute::recast<uint32_t>(src)(0);
    auto&& o = cute::recast<Words>(dst)(0);
    // Level bytes of nibbles 0-3 (a) and 4-7 (b); elements 2p and 2p + 1 are nibbles p and p + 4.
    uint32_t la, ha, lb, hb;
    lora_fused::cuda::nf4_level_bytes4(w, la, ha);
    lora_fused::cuda::nf4_level_bytes4(w >> 16, lb, hb);
    const uint32_t lo03 = __byte_perm(la, lb, 0x5140u), hi03 = __byte_perm(ha, hb, 0x5140u);  // elements 0-3
    const uint32_t lo47 = __byte_perm(la, lb, 0x7362u), hi47 = __byte_perm(ha, hb, 0x7362u);  // elements 4-7
    o[0] = __byte_perm(lo03, hi03, 0x5140u);
    o[1] = __byte_perm(lo03, hi03, 0x7362u);
    o[2] = __byte_perm(lo47, hi47, 0x5140u);
    o[3] = __byte_perm(lo47, hi47, 0x7362u);
  }
};
}  // namespace cutlass

namespace lora_fused::sm90 {
namespace nf4_gemm_detail {
using namespace cute;
using ElementX = cutlass::bfloat16_t;  // [M, K] K-major
using ElementScale = cutlass::bfloat16_t;
using ElementOut = cutlass::bfloat16_t;
using Acc = float;
// Swapped and transposed (the narrow type must be the collective's A): D^T[N, M] = W[N, K] X[M, K]^T.
using LayoutW = cutlass::layout::RowMajor;      // N x K
using LayoutX = cutlass::layout::ColumnMajor;   // K x M seen as B
using LayoutD = cutlass::layout::ColumnMajor;   // N x M column-major = Y [M, N] row-major
constexpr int AlW = 128 / 4, AlX = 8, AlD = 8;
constexpr int kGroup = 64;

// The reordered weight layout (nf4_repack): per 16 x 16 atom of W, each lane's 8 values of the
// m16 x k16 A fragment (rows g, g + 8 = m; k 2t + e, 2t + 8 + e; lane 4g + t) sit in one 32-bit word
// in the value order [0,2,4,6,1,3,5,7]: offset 32g + 8t + 4e + h + 2j for row g + 8h, k e + 2t + 8j.
// Atoms tile W with the rows' atoms first (tile_to_shape's column-major order).
using ShuffleAtom = Layout<Shape<Shape<_8, _2>, Shape<_2, _4, _2>>, Stride<Stride<_32, _1>, Stride<_4, _8, _2>>>;
using StrideWRowMajor = cutlass::detail::TagToStrideA_t<LayoutW>;
using LayoutWShuffled = decltype(tile_to_shape(ShuffleAtom{}, Layout<Shape<int, int, int>, StrideWRowMajor>{}));
inline LayoutWShuffled shuffled_layout(int n, int k) {
  return tile_to_shape(ShuffleAtom{}, make_layout(make_shape(n, k, 1), StrideWRowMajor{int64_t(k), _1{}, int64_t(0)}));
}

// TileTokens: the tile's extent along the tokens (x's rows); the weight rows' extent is 128 and the
// k tile 64 (the collective loads one scale row per k-tile, so the group must be a multiple of it).
// Shuffled: W in nf4_repack's layout (needs N % 16 == 0), read from shared memory a word per thread.
template <int TileTokens, bool Shuffled = false>
struct Nf4Gemm {
  using ElementW = cute::conditional_t<Shuffled, lora_fused::nf4s_t, lora_fused::nf4_t>;
  using LayoutWArg = cute::conditional_t<Shuffled, LayoutWShuffled, LayoutW>;
  using TileShape = Shape<_128, Int<TileTokens>, _64>;
  using ClusterShape = Shape<_1, _1, _1>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc, void, LayoutD, AlD, ElementOut, LayoutD, AlD,
      cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cute::tuple<ElementW, ElementScale>, LayoutWArg, AlW, ElementX,
      LayoutX, AlX, Acc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  // Stream-K: with few tokens there are only N / 128 output tiles (32 at N = 4096) for 132 SMs, so
  // the persistent grid splits K among CTAs (partials reduced in the workspace); with many tiles
  // its heuristic keeps whole tiles per CTA.
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue,
                                                          cutlass::gemm::StreamKScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  static typename GemmKernel::StrideA stride_w(const Nf4GemmProblem& p) {
    if constexpr (Shuffled) {
      return shuffled_layout(p.n, p.k);
    } else {
      return typename GemmKernel::StrideA{int64_t(p.k), cute::Int<1>{}, int64_t(0)};
    }
  }
  static typename Gemm::Arguments arguments(const Nf4GemmProblem& p) {
    using StrideS = typename CollectiveMainloop::StrideScale;  // (N, K / 64): N contiguous
    const int64_t k = p.k, n = p.n;
    cutlass::KernelHardwareInfo hw;
    hw.sm_count = p.sm_count;  // 0: CUTLASS asks the driver
    return typename Gemm::Arguments{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {p.n, p.m, p.k, 1},
        {reinterpret_cast<const ElementW*>(p.w), stride_w(p),
         reinterpret_cast<const ElementX*>(p.x), typename GemmKernel::StrideB{k, cute::Int<1>{}, int64_t(0)},
         reinterpret_cast<const ElementScale*>(p.scales), StrideS{cute::Int<1>{}, n, int64_t(0)}, kGroup},
        {{1.f, 0.f}, nullptr, typename GemmKernel::StrideC{cute::Int<1>{}, n, int64_t(0)},
         reinterpret_cast<ElementOut*>(p.y), typename GemmKernel::StrideD{cute::Int<1>{}, n, int64_t(0)}},
        hw};
  }
  static size_t workspace_bytes(const Nf4GemmProblem& p) { return Gemm::get_workspace_size(arguments(p)); }
  // Asked before the tensors exist: CUTLASS refuses a null scale pointer (it never dereferences
  // the pointers here), so null ones stand in as a 256-byte aligned placeholder.
  static bool can_implement(const Nf4GemmProblem& p) {
    Nf4GemmProblem q = p;
    const void* placeholder = reinterpret_cast<const void*>(uintptr_t{256});
    if (q.scales == nullptr) q.scales = placeholder;
    if (q.x == nullptr) q.x = placeholder;
    if (q.w == nullptr) q.w = placeholder;
    if (q.y == nullptr) q.y = const_cast<void*>(placeholder);
    return q.k % kGroup == 0 && (!Shuffled || q.n % 16 == 0) && Gemm::can_implement(arguments(q)) == cutlass::Status::kSuccess;
  }
  static const char* run(const Nf4GemmProblem& p, void* workspace, cudaStream_t stream) {
    Gemm gemm;
    const auto args = arguments(p);
    if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return "CUTLASS initialize failed";
    if (gemm.run(stream) != cutlass::Status::kSuccess) return "CUTLASS run failed";
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
  }
  static constexpr Nf4GemmOps ops() { return Nf4GemmOps{&workspace_bytes, &can_implement, &run}; }
};

}  // namespace nf4_gemm_detail
}  // namespace lora_fused::sm90
