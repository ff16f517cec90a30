// NF4 quantization on CUDA, byte-identical to the CPU version (same nf4_format.h arithmetic).
// One warp per quantization block: the lanes reduce |w| to absmax, then each lane packs byte j
// from elements 2j, 2j+1 (blocks start at even elements, so no byte straddles two blocks).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/common.cuh"
#include "nf4_format.h"

namespace lora_fused {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename in_t>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    nf4_quantize_kernel(const in_t* __restrict__ w, int64_t n, int64_t blocksize, int64_t blocks,
                        uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= blocks) return;
  const int64_t start = b * blocksize;
  const int64_t end = start + blocksize < n ? start + blocksize : n;
  float amax = 0.0f;
  for (int64_t i = start + lane; i < end; i += 32) amax = fmaxf(amax, fabsf(static_cast<float>(w[i])));
  amax = cuda::warp_max(amax);
  if (lane == 0) absmax[b] = amax;
  const float inv = nf4::inverse_absmax(amax);
  for (int64_t i = start + 2 * lane; i < end; i += 64) {
    const int hi = nf4::quantize_scaled(static_cast<float>(w[i]) * inv);
    const int lo = i + 1 < n ? nf4::quantize_scaled(static_cast<float>(w[i + 1]) * inv) : nf4::kPadNibble;
    packed[i / 2] = static_cast<uint8_t>((hi << 4) | lo);
  }
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cuda(const at::Tensor& w_in, int64_t blocksize) {
  check_nf4_quantize_args(w_in, blocksize);
  check_device(w_in, at::kCUDA, "lora_fused.nf4_quantize", "w");
  const c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = w_in.contiguous();
  const int64_t n = w.numel();
  const int64_t blocks = cuda::ceil_div<int64_t>(n, blocksize);
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, w.options().dtype(at::kFloat));
  if (n == 0) return {packed, absmax};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned int grid = cuda::grid_x(cuda::ceil_div<int64_t>(blocks, kWarpsPerBlock), "lora_fused.nf4_quantize");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "nf4_quantize_cuda", [&] {
    nf4_quantize_kernel<scalar_t><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
        w.data_ptr<scalar_t>(), n, blocksize, blocks, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {packed, absmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_fused, CUDA, m) { m.impl("nf4_quantize", &nf4_quantize_cuda); }

}  // namespace lora_fused
