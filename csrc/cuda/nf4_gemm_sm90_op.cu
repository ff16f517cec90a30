// lora_fused::nf4_gemm_sm90: y = x @ dequant(W)^T on Hopper through the mixed-input CUTLASS GEMM of
// cuda/sm90/nf4_gemm_*.cu, W as NF4 codes (bitsandbytes' packing, or with shuffled=True the layout
// lora_fused::nf4_repack_sm90 makes) with bf16 scales per 64-element group ([K / 64, N]); the ops
// check their inputs, and the host side (nf4_gemm_sm90.h) also serves nf4_linear's Hopper path.
// CUDA (sm_90a builds) only: probes of the GEMM's variants.
#include "cuda/nf4_gemm_sm90.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#if LORA_FUSED_WITH_SM90
#include "cuda/sm90/nf4_gemm.cuh"
#endif

namespace lora_fused {
namespace cuda {

bool nf4_gemm_sm90_available() {
#if LORA_FUSED_WITH_SM90
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return prop->major == 9 && prop->minor == 0;
#else
  return false;
#endif
}

#if LORA_FUSED_WITH_SM90
namespace {
const sm90::Nf4GemmOps& tile_ops(int64_t tile_tokens, bool shuffled) {
  TORCH_CHECK(tile_tokens == 128 || tile_tokens == 256, "lora_fused.nf4_gemm_sm90: tile_tokens must be 128 or 256; got ",
              tile_tokens);
  if (shuffled) return tile_tokens == 128 ? sm90::kNf4Gemm128x128Shuffled : sm90::kNf4Gemm128x256Shuffled;
  return tile_tokens == 128 ? sm90::kNf4Gemm128x128 : sm90::kNf4Gemm128x256;
}

sm90::Nf4GemmProblem problem(int64_t m, int64_t n, int64_t k) {
  sm90::Nf4GemmProblem p;
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  // Left at 0, CUTLASS asks the driver for the SM count on every can_implement / workspace query:
  // hundreds of microseconds of host per nf4_linear call (session 13's host profile).
  p.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return p;
}
}  // namespace
#endif

bool nf4_gemm_sm90_can_implement(int64_t m, int64_t n, int64_t k, bool shuffled) {
#if LORA_FUSED_WITH_SM90
  // Both tiles take the same problems (the constraints are the k tile's and the alignments).
  return m >= 1 && m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX &&
         tile_ops(128, shuffled).can_implement(problem(m, n, k));
#else
  return false;
#endif
}

at::Tensor nf4_gemm_sm90_run(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t n,
                             int64_t tile_tokens, bool shuffled) {
#if LORA_FUSED_WITH_SM90
  const sm90::Nf4GemmOps& ops = tile_ops(tile_tokens, shuffled);
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(nf4_gemm_sm90_can_implement(m, n, k, shuffled), "lora_fused.nf4_gemm_sm90: CUTLASS cannot take M=", m,
              " N=", n, " K=", k, shuffled ? " (needs K % 64 == 0 and N % 16 == 0)" : " (needs K % 64 == 0 and N % 8 == 0)");
  at::Tensor y = at::empty({m, n}, x.options());
  sm90::Nf4GemmProblem p = problem(m, n, k);
  p.x = x.data_ptr();
  p.w = packed.data_ptr();
  p.scales = scales.data_ptr();
  p.y = y.data_ptr();
  const size_t ws_bytes = ops.workspace_bytes(p);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  const char* err = ops.run(p, ws_bytes > 0 ? ws.data_ptr() : nullptr, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, "lora_fused.nf4_gemm_sm90: ", err);
  return y;
#else
  TORCH_CHECK(false, "lora_fused.nf4_gemm_sm90: this build has no Hopper GEMMs (build_info()['sm90_gemm'] is False)");
#endif
}

at::Tensor contiguous_aligned16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

namespace {

at::Tensor nf4_gemm_sm90_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                              int64_t out_features, int64_t tile_tokens, bool shuffled) {
  TORCH_CHECK(x.is_cuda() && packed.is_cuda() && scales.is_cuda(), "lora_fused.nf4_gemm_sm90: CUDA tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "lora_fused.nf4_gemm_sm90: x must be bf16 [M, K]; got ",
              x.scalar_type(), " ", x.sizes());
  const int64_t k = x.size(1), n = out_features;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() * 2 == n * k,
              "lora_fused.nf4_gemm_sm90: packed must hold N*K/2 uint8 codes; got ", packed.numel(), " for N=", n, " K=", k);
  TORCH_CHECK(k % 64 == 0 && scales.scalar_type() == at::kBFloat16 && scales.numel() == n * (k / 64),
              "lora_fused.nf4_gemm_sm90: needs K % 64 == 0 and bf16 scales [K / 64, N]; got K=", k, ", scales ",
              scales.scalar_type(), " ", scales.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(nf4_gemm_sm90_available(), "lora_fused.nf4_gemm_sm90: needs an sm_90 GPU and an sm_90a build; this GPU is sm_",
              prop->major, prop->minor, ", build_info()['sm90_gemm'] tells the build");
  return nf4_gemm_sm90_run(contiguous_aligned16(x), contiguous_aligned16(packed), contiguous_aligned16(scales), n,
                           tile_tokens, shuffled);
}

at::Tensor nf4_repack_sm90_cuda(const at::Tensor& packed, int64_t out_features, int64_t in_features) {
  const int64_t n = out_features, k = in_features;
  TORCH_CHECK(packed.is_cuda() && packed.scalar_type() == at::kByte && packed.numel() * 2 == n * k,
              "lora_fused.nf4_repack_sm90: packed must be CUDA uint8 with N*K/2 codes; got ", packed.scalar_type(), " ",
              packed.device(), " with ", packed.numel(), " for N=", n, " K=", k);
  TORCH_CHECK(n % 16 == 0 && k % 64 == 0 && n <= INT32_MAX && k <= INT32_MAX,
              "lora_fused.nf4_repack_sm90: needs N % 16 == 0 and K % 64 == 0; got N=", n, " K=", k);
  const c10::cuda::CUDAGuard guard(packed.device());
  TORCH_CHECK(nf4_gemm_sm90_available(), "lora_fused.nf4_repack_sm90: needs an sm_90 GPU and an sm_90a build");
  const at::Tensor src = contiguous_aligned16(packed);
  at::Tensor dst = at::empty({n * k / 2}, packed.options());
#if LORA_FUSED_WITH_SM90
  const char* err = sm90::nf4_repack(src.data_ptr(), dst.data_ptr(), static_cast<int>(n), static_cast<int>(k),
                                     at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, "lora_fused.nf4_repack_sm90: ", err);
#endif
  return dst;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_FRAGMENT(lora_fused, m) {
  m.def("nf4_gemm_sm90(Tensor x, Tensor packed, Tensor scales, int out_features, int tile_tokens=128, "
        "bool shuffled=False) -> Tensor");
  m.def("nf4_repack_sm90(Tensor packed, int out_features, int in_features) -> Tensor");
}
TORCH_LIBRARY_IMPL(lora_fused, CUDA, m) {
  m.impl("nf4_gemm_sm90", &cuda::nf4_gemm_sm90_cuda);
  m.impl("nf4_repack_sm90", &cuda::nf4_repack_sm90_cuda);
}

}  // namespace lora_fused
