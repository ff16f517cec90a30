// lora_dropout on CUDA: one Philox call per group of 4 consecutive (row-major) elements, a
// grid-stride loop over groups; x read through its strides, the output contiguous. The seed is read
// from device memory, so the op is CUDA-graph safe when the seed tensor comes from torch's RNG.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/common.cuh"
#include "lora_dropout.h"
#include "philox.h"

namespace lora_fused {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    lora_dropout_kernel(const scalar_t* __restrict__ x, int64_t ldx, int64_t col_stride, int64_t cols, int64_t n,
                        const int64_t* __restrict__ seed, float p, at::opmath_type<scalar_t> scale,
                        scalar_t* __restrict__ out) {
  const uint64_t key = static_cast<uint64_t>(*seed);
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = blockIdx.x * int64_t(kThreads) + threadIdx.x; g < groups; g += int64_t(gridDim.x) * kThreads) {
    const Philox4 r = philox4x32_10(static_cast<uint64_t>(g), key);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = 4 * g + j;
      if (i >= n) break;
      const bool keep = philox_uniform(r.v[j]) >= p;
      const auto v = static_cast<at::opmath_type<scalar_t>>(x[(i / cols) * ldx + (i % cols) * col_stride]);
      out[i] = keep ? static_cast<scalar_t>(v * scale) : scalar_t(0);
    }
  }
}

at::Tensor lora_dropout_cuda(const at::Tensor& x, double p, const at::Tensor& seed) {
  check_lora_dropout_args(x, p, seed, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) return out;
  const int64_t groups = (n + 3) / 4;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>(cuda::ceil_div<int64_t>(groups, kThreads), int64_t(sms) * 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout_cuda", [&] {
    lora_dropout_kernel<scalar_t><<<cuda::grid_x(blocks, "lora_fused.lora_dropout"), kThreads, 0,
                                    at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.size(1), n, seed.data_ptr<int64_t>(),
        static_cast<float>(p), static_cast<at::opmath_type<scalar_t>>(1.0 / (1.0 - p)), out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_fused, CUDA, m) { m.impl("lora_dropout", &lora_dropout_cuda); }

}  // namespace lora_fused
