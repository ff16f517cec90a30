// 8-bit blockwise quantization to the nearest of 256 sorted code values, on CUDA; the same
// arithmetic as the CPU version (count of fp32 midpoints strictly below the scaled value).
// One warp per block: reduce absmax, then each lane binary-searches the midpoints in shared memory.
#include <torch/library.h>

#include "checks.h"
#include "cuda/common.cuh"
#include "nf4_format.h"

namespace lora_fused {
namespace {

constexpr int kWarpsPerBlock = 8;

__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    blockwise_quantize_kernel(const float* __restrict__ x, int64_t n, int64_t blocksize, int64_t blocks,
                              const float* __restrict__ code, uint8_t* __restrict__ q, float* __restrict__ absmax) {
  __shared__ float mid[255];
  for (int i = threadIdx.x; i < 255; i += blockDim.x) mid[i] = 0.5f * (code[i] + code[i + 1]);
  __syncthreads();
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= blocks) return;
  const int64_t start = b * blocksize;
  const int64_t end = start + blocksize < n ? start + blocksize : n;
  float amax = 0.0f;
  for (int64_t i = start + lane; i < end; i += 32) amax = fmaxf(amax, fabsf(x[i]));
  amax = cuda::warp_max(amax);
  if (lane == 0) absmax[b] = amax;
  const float inv = nf4::inverse_absmax(amax);
  for (int64_t i = start + lane; i < end; i += 32) {
    const float s = fminf(1.0f, fmaxf(-1.0f, x[i] * inv));
    int lo = 0, hi = 255;  // first midpoint >= s, i.e. the number of midpoints below s
    while (lo < hi) {
      const int m = (lo + hi) / 2;
      if (mid[m] < s) lo = m + 1; else hi = m;
    }
    q[i] = static_cast<uint8_t>(lo);
  }
}

std::tuple<at::Tensor, at::Tensor> blockwise_quantize_cuda(const at::Tensor& x_in, const at::Tensor& code_in,
                                                           int64_t blocksize) {
  check_blockwise_quantize_args(x_in, code_in, blocksize);
  check_device(x_in, at::kCUDA, "lora_fused.blockwise_quantize", "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor code = code_in.contiguous();
  const int64_t n = x.numel();
  const int64_t blocks = cuda::ceil_div<int64_t>(n, blocksize);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, x.options().dtype(at::kFloat));
  if (n == 0) return {q, absmax};
  const unsigned int grid =
      cuda::grid_x(cuda::ceil_div<int64_t>(blocks, kWarpsPerBlock), "lora_fused.blockwise_quantize");
  blockwise_quantize_kernel<<<grid, kWarpsPerBlock * 32, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<float>(), n, blocksize, blocks, code.data_ptr<float>(), q.data_ptr<uint8_t>(),
      absmax.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, absmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_fused, CUDA, m) { m.impl("blockwise_quantize", &blockwise_quantize_cuda); }

}  // namespace lora_fused
