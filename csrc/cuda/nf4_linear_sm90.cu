// nf4_linear's Hopper path (nf4_linear_sm90.h). The GEMM takes one bf16 scale per 64-element group,
// N-contiguous ([K / 64, N]): a small kernel decodes the (double-quantized) absmax into that form at
// each call (N*K/64 values), so no state is cached beside the weight. Rounding: level (bf16) x scale (bf16), rounded to bf16, where the slab path
// rounds level x scale once from fp32; measured 1.30-1.34x PyTorch's error on the dequantized bf16
// weight (scripts/probe_nf4_gemm_sm90.py), within the 2x rule.
#include "cuda/nf4_linear_sm90.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>

#include <cstdlib>
#include <cstring>

#include "cuda/common.cuh"
#include "cuda/nf4_decode.cuh"
#include "cuda/nf4_gemm_sm90.h"

namespace lora_fused {
namespace cuda {
namespace {

constexpr int64_t kGroup = 64;

// out[g, row] = bf16(scale of block row * groups + g): K % 64 == 0, so 64-element blocks never span
// rows. A 32 x 32 tile through shared memory, so that both the reads of the block constants (along
// g) and the writes (along rows) are contiguous across a warp: written directly, the reads strided
// by `groups` bytes and the call took 22 us at 8192->28672 on an H200.
constexpr int kScaleTile = 32, kScaleRowsPerPass = 8;
__global__ void group_scales_kernel(BlockScales s, int64_t n, int64_t groups, int64_t ld, __nv_bfloat16* __restrict__ out) {
  __shared__ float tile[kScaleTile][kScaleTile + 1];
  const int64_t tiles_g = ceil_div<int64_t>(groups, kScaleTile);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) / tiles_g * kScaleTile;
  const int64_t g0 = static_cast<int64_t>(blockIdx.x) % tiles_g * kScaleTile;
  for (int i = threadIdx.y; i < kScaleTile; i += kScaleRowsPerPass) {
    const int64_t row = r0 + i, g = g0 + threadIdx.x;
    if (row < n && g < groups) tile[i][threadIdx.x] = s(row * groups + g);
  }
  __syncthreads();
  for (int i = threadIdx.y; i < kScaleTile; i += kScaleRowsPerPass) {
    const int64_t g = g0 + i, row = r0 + threadIdx.x;
    if (row < n && g < groups) out[g * ld + row] = __float2bfloat16_rn(tile[threadIdx.x][i]);
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

}  // namespace

at::Tensor nf4_group_scales(const Nf4Weight& w, int64_t ld) {
  const int64_t n = w.out_features, groups = w.in_features / kGroup;
  TORCH_CHECK(w.blocksize == kGroup && w.in_features % kGroup == 0 && ld >= n, "lora_fused: nf4_group_scales needs blocksize ",
              kGroup, ", K % 64 == 0 and ld >= N; got blocksize ", w.blocksize, ", K=", w.in_features, ", ld=", ld);
  at::Tensor scales = at::empty({groups, ld}, w.packed.options().dtype(at::kBFloat16));
  const int64_t tiles = ceil_div<int64_t>(n, kScaleTile) * ceil_div<int64_t>(groups, kScaleTile);
  group_scales_kernel<<<grid_x(tiles, "lora_fused.nf4_group_scales"), dim3(kScaleTile, kScaleRowsPerPass), 0,
                        at::cuda::getCurrentCUDAStream()>>>(make_block_scales(w), n, groups, ld,
                                                            reinterpret_cast<__nv_bfloat16*>(scales.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return scales;
}

Nf4GemmMode nf4_gemm_mode() {
  const char* env = std::getenv("LORA_FUSED_NF4_GEMM");
  if (env == nullptr || std::strcmp(env, "auto") == 0 || env[0] == '\0') return Nf4GemmMode::kAuto;
  if (std::strcmp(env, "sm90") == 0) return Nf4GemmMode::kSm90;
  if (std::strcmp(env, "ss") == 0) return Nf4GemmMode::kSs;
  TORCH_CHECK(std::strcmp(env, "slab") == 0, "lora_fused.nf4_linear: LORA_FUSED_NF4_GEMM must be auto, sm90, slab or ss; got '",
              env, "'");
  return Nf4GemmMode::kSlab;
}

bool nf4_linear_sm90(const at::Tensor& x, const Nf4Weight& w, const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& lora_u, const c10::optional<at::Tensor>& lora_B,
                     const c10::optional<at::Tensor>& lora_A, double lora_scale, at::Tensor& out) {
  // ss: nf4_linear_ss.cu's kernel, tried first; where it does not apply, as auto here.
  Nf4GemmMode md = nf4_gemm_mode();
  if (md == Nf4GemmMode::kSs) md = Nf4GemmMode::kAuto;
  if (md == Nf4GemmMode::kSlab) return false;
  const int64_t m = x.size(0), n = w.out_features, k = w.in_features;
  if (md == Nf4GemmMode::kAuto && (m <= 16 || m > kNf4Sm90MaxM)) return false;  // before asking CUTLASS: host time
  const bool takes = x.scalar_type() == at::kBFloat16 && w.blocksize == kGroup && k % kGroup == 0 && n % 8 == 0 &&
                     m >= 1 && aligned16(w.packed) && nf4_gemm_sm90_available() && nf4_gemm_sm90_can_implement(m, n, k);
  if (md == Nf4GemmMode::kAuto && (!takes || m <= 16 || m > kNf4Sm90MaxM)) return false;
  // Forced, a call the GEMM cannot take is an error rather than a silent fallback (tests rely on it).
  TORCH_CHECK(takes, "lora_fused.nf4_linear: LORA_FUSED_NF4_GEMM=sm90, but the Hopper NF4 GEMM takes only bf16 x, blocksize ",
              kGroup, ", K % 64 == 0, N % 8 == 0, a 16-byte aligned weight, on an sm_90 GPU with an sm_90a build; got ",
              x.scalar_type(), " M=", m, " N=", n, " K=", k, " blocksize ", w.blocksize);
  const at::Tensor xc = contiguous_aligned16(x);
  out = nf4_gemm_sm90_run(xc, w.packed, nf4_group_scales(w, n), n, m <= kNf4Sm90Tile128MaxM ? 128 : 256);
  // The LoRA term and the bias after the GEMM, one pass each over out ([M, N], M <= 1024): the GEMM's
  // epilogue has no source operand yet.
  if (lora_A.has_value()) {
    out.addmm_(nf4_lora_u(x, *lora_A, lora_scale), lora_B->t());
  } else if (lora_u.has_value()) {
    out.addmm_(*lora_u, lora_B->t());
  }
  if (bias.has_value()) out.add_(*bias);
  return true;
}

}  // namespace cuda
}  // namespace lora_fused
