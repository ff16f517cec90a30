// lora_fused::nf4_gemm_sm90 (work in progress, branch wip/nf4-gemm-sm90): y = x @ dequant(W)^T on
// Hopper through the mixed-input CUTLASS GEMM of cuda/sm90/nf4_gemm_bf16.cu, W as NF4 codes
// (bitsandbytes' packing) with bf16 scales per 64-element group ([K / 64, N]), for probing its speed and accuracy
// beside nf4_linear's slab path (scripts/probe_nf4_gemm_sm90.py). CUDA (sm_90a builds) only.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#if LORA_FUSED_WITH_SM90
#include "cuda/sm90/nf4_gemm.cuh"
#endif

namespace lora_fused {
namespace {

at::Tensor nf4_gemm_sm90_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                              int64_t out_features) {
  TORCH_CHECK(x.is_cuda() && packed.is_cuda() && scales.is_cuda(), "lora_fused.nf4_gemm_sm90: CUDA tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "lora_fused.nf4_gemm_sm90: x must be bf16 [M, K]; got ",
              x.scalar_type(), " ", x.sizes());
  const int64_t m = x.size(0), k = x.size(1), n = out_features;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() * 2 == n * k,
              "lora_fused.nf4_gemm_sm90: packed must hold N*K/2 uint8 codes; got ", packed.numel(), " for N=", n, " K=", k);
  TORCH_CHECK(k % 64 == 0 && scales.scalar_type() == at::kBFloat16 && scales.numel() == n * (k / 64),
              "lora_fused.nf4_gemm_sm90: needs K % 64 == 0 and bf16 scales [K / 64, N]; got K=", k, ", scales ",
              scales.scalar_type(), " ", scales.sizes());
#if LORA_FUSED_WITH_SM90
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major == 9 && prop->minor == 0, "lora_fused.nf4_gemm_sm90: needs an sm_90 GPU; this one is sm_",
              prop->major, prop->minor);
  const at::Tensor xc = x.contiguous(), wc = packed.contiguous(), sc = scales.contiguous();
  at::Tensor y = at::empty({m, n}, x.options());
  sm90::Nf4GemmProblem p;
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.x = xc.data_ptr();
  p.w = wc.data_ptr();
  p.scales = sc.data_ptr();
  p.y = y.data_ptr();
  TORCH_CHECK(sm90::nf4_gemm_can_implement(p), "lora_fused.nf4_gemm_sm90: CUTLASS cannot take M=", m, " N=", n, " K=", k,
              " (alignment: K % 32, N % 8)");
  const size_t ws_bytes = sm90::nf4_gemm_workspace_bytes(p);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  const char* err = sm90::nf4_gemm_run(p, ws_bytes > 0 ? ws.data_ptr() : nullptr, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, "lora_fused.nf4_gemm_sm90: ", err);
  return y;
#else
  TORCH_CHECK(false, "lora_fused.nf4_gemm_sm90: this build has no Hopper GEMMs (build_info()['sm90_gemm'] is False)");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lora_fused, m) {
  m.def("nf4_gemm_sm90(Tensor x, Tensor packed, Tensor scales, int out_features) -> Tensor");
}
TORCH_LIBRARY_IMPL(lora_fused, CUDA, m) { m.impl("nf4_gemm_sm90", &nf4_gemm_sm90_cuda); }

}  // namespace lora_fused
