// NF4 x bf16 GEMM on Hopper (nf4_gemm.cuh): CUTLASS 3's sm90 mixed-input collective with a
// 4-bit element type of our own (nf4_t), whose conversion to bf16 is a byte_perm table lookup.
// Correct on an H100 (tests/test_nf4_gemm_sm90.py) but at 0.5-0.6x cuBLAS bf16's speed
// (scripts/probe_nf4_gemm_sm90.py; 4-bit A fragments read from unshuffled shared memory): not used by
// nf4_linear yet.
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>

#include "cuda/sm90/nf4_gemm.cuh"

namespace lora_fused {
// An NF4 code (0..15), stored 2 per byte in bitsandbytes' order.
struct nf4_t : cutlass::integer_subbyte<4, false> {
  using Base = cutlass::integer_subbyte<4, false>;
  using Base::Base;
  CUTLASS_HOST_DEVICE nf4_t() = default;
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
    constexpr uint32_t lo0 = 0xca063280u, lo1 = 0x00ba3d92u, lo2 = 0xad7c25a3u, lo3 = 0x803910e2u;
    constexpr uint32_t hi0 = 0xbebfbfbfu, hi1 = 0x00bdbebeu, hi2 = 0x3e3e3e3du, hi3 = 0x3f3f3f3eu;
    const uint32_t w = reinterpret_cast<uint32_t const&>(source);
    // CUTLASS reads element i at bits 4i; bitsandbytes put element 2j at bits 8j + 4: swap the nibbles.
    const uint32_t s = ((w >> 4) & 0x0f0f0f0fu) | ((w << 4) & 0xf0f0f0f0u);
    result_type out;
    uint32_t* o = reinterpret_cast<uint32_t*>(&out);
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
      const uint32_t sel = (s >> (16 * h)) & 0xffffu;  // 4 selectors
      const uint32_t sel3 = sel & 0x7777u;
      // byte k of the mask: 0xff where selector k >= 8 (its bit 3 moved to bit 0 of byte k, times 0xff;
      // __byte_perm has no sign-replicating mode: it reads only 3 bits of each selector).
      const uint32_t t = sel & 0x8888u;
      const uint32_t bit = ((t >> 3) & 1u) | ((t & 0x80u) << 1) | ((t & 0x800u) << 5) | ((t & 0x8000u) << 9);
      const uint32_t mask = bit * 0xffu;
      const uint32_t lo = (__byte_perm(lo0, lo1, sel3) & ~mask) | (__byte_perm(lo2, lo3, sel3) & mask);
      const uint32_t hi = (__byte_perm(hi0, hi1, sel3) & ~mask) | (__byte_perm(hi2, hi3, sel3) & mask);
      o[2 * h] = __byte_perm(lo, hi, 0x5140u);
      o[2 * h + 1] = __byte_perm(lo, hi, 0x7362u);
    }
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
}  // namespace cutlass

namespace lora_fused::sm90 {
namespace {
using namespace cute;
using ElementW = lora_fused::nf4_t;  // narrow operand, [N, K] K-major
using ElementX = cutlass::bfloat16_t;  // [M, K] K-major
using ElementScale = cutlass::bfloat16_t;
using ElementOut = cutlass::bfloat16_t;
using Acc = float;
// Swapped and transposed (the narrow type must be the collective's A): D^T[N, M] = W[N, K] X[M, K]^T.
using LayoutW = cutlass::layout::RowMajor;      // N x K
using LayoutX = cutlass::layout::ColumnMajor;   // K x M seen as B
using LayoutD = cutlass::layout::ColumnMajor;   // N x M column-major = Y [M, N] row-major
constexpr int AlW = 128 / 4, AlX = 8, AlD = 8;
// K tile 64: the collective loads one scale row per k-tile, so the group (64) must be a multiple of it.
using TileShape = Shape<_128, _128, _64>;
using ClusterShape = Shape<_1, _1, _1>;
using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc, void, LayoutD, AlD, ElementOut, LayoutD, AlD,
    cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;
using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cute::tuple<ElementW, ElementScale>, LayoutW, AlW, ElementX,
    LayoutX, AlX, Acc, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
    cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

constexpr int kGroup = 64;

typename Gemm::Arguments arguments(const Nf4GemmProblem& p) {
  using StrideS = typename CollectiveMainloop::StrideScale;  // (N, K / 64): N contiguous
  const int64_t k = p.k, n = p.n;
  return typename Gemm::Arguments{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {p.n, p.m, p.k, 1},
      {reinterpret_cast<const ElementW*>(p.w), typename GemmKernel::StrideA{k, cute::Int<1>{}, int64_t(0)},
       reinterpret_cast<const ElementX*>(p.x), typename GemmKernel::StrideB{k, cute::Int<1>{}, int64_t(0)},
       reinterpret_cast<const ElementScale*>(p.scales), StrideS{cute::Int<1>{}, n, int64_t(0)}, kGroup},
      {{1.f, 0.f}, nullptr, typename GemmKernel::StrideC{cute::Int<1>{}, n, int64_t(0)},
       reinterpret_cast<ElementOut*>(p.y), typename GemmKernel::StrideD{cute::Int<1>{}, n, int64_t(0)}}};
}
}  // namespace

size_t nf4_gemm_workspace_bytes(const Nf4GemmProblem& p) { return Gemm::get_workspace_size(arguments(p)); }

bool nf4_gemm_can_implement(const Nf4GemmProblem& p) {
  return p.k % kGroup == 0 && Gemm::can_implement(arguments(p)) == cutlass::Status::kSuccess;
}

const char* nf4_gemm_run(const Nf4GemmProblem& p, void* workspace, cudaStream_t stream) {
  Gemm gemm;
  const auto args = arguments(p);
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return "CUTLASS initialize failed";
  if (gemm.run(stream) != cutlass::Status::kSuccess) return "CUTLASS run failed";
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace lora_fused::sm90
