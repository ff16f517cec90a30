// lora_shrink on CUDA: u[M, r] = scale * x[M, k] @ A[r, k]^T.
// bf16/fp16 with k % 8 == 0 on sm_80+ run the tensor-core kernel (lora_shrink_mma.cu; x or A
// copied first if their rows are not 16-byte aligned). The rest (fp32, fp64, odd k) run the simple
// kernel here: a 256-thread block owns ROWS rows of x and RT ranks; its threads stride over k, each
// keeping ROWS x RT fp32 partial sums, which a warp shuffle then shared memory reduce. A may have
// any strides.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/common.cuh"
#include "cuda/lora_shrink_mma.h"

namespace lora_fused {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 4;
constexpr int kRanks = 16;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) lora_shrink_kernel(const scalar_t* __restrict__ x, int64_t ldx,
                                                                const scalar_t* __restrict__ a, int64_t a_sr,
                                                                int64_t a_sk, scalar_t* __restrict__ u, int64_t M,
                                                                int64_t K, int64_t R, acc_t scale) {
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRanks;
  acc_t acc[kRows][kRanks];
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int j = 0; j < kRanks; ++j) acc[i][j] = acc_t(0);

  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    acc_t xv[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) xv[i] = m0 + i < M ? static_cast<acc_t>(x[(m0 + i) * ldx + k]) : acc_t(0);
#pragma unroll
    for (int j = 0; j < kRanks; ++j) {
      if (r0 + j < R) {
        const acc_t av = static_cast<acc_t>(a[(r0 + j) * a_sr + k * a_sk]);
#pragma unroll
        for (int i = 0; i < kRows; ++i) acc[i][j] = cuda::fma_acc(xv[i], av, acc[i][j]);
      }
    }
  }

  __shared__ acc_t partial[kWarps][kRows * kRanks];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int j = 0; j < kRanks; ++j) {
      const acc_t s = cuda::warp_sum(acc[i][j]);
      if (lane == 0) partial[warp][i * kRanks + j] = s;
    }
  __syncthreads();
  for (int t = threadIdx.x; t < kRows * kRanks; t += kThreads) {
    const int64_t m = m0 + t / kRanks, r = r0 + t % kRanks;
    if (m < M && r < R) {
      acc_t s = acc_t(0);
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += partial[w][t];
      u[m * R + r] = static_cast<scalar_t>(s * scale);
    }
  }
}

at::Tensor lora_shrink_cuda(const at::Tensor& x_in, const at::Tensor& lora_a, double scale) {
  check_lora_shrink_args(x_in, lora_a);
  check_device(x_in, at::kCUDA, "lora_fused.lora_shrink", "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), R = lora_a.size(0);
  at::Tensor u = at::empty({M, R}, x.options());
  if (M == 0) return u;
  if (K == 0) return u.zero_();
  if (lora_shrink_mma(x, lora_a, scale, u)) return u;
  const dim3 grid(cuda::grid_x(cuda::ceil_div<int64_t>(M, kRows), "lora_fused.lora_shrink"),
                  static_cast<unsigned int>(cuda::ceil_div<int64_t>(R, kRanks)));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_shrink_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    lora_shrink_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), x.stride(0), lora_a.data_ptr<scalar_t>(), lora_a.stride(0), lora_a.stride(1),
        u.data_ptr<scalar_t>(), M, K, R, static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return u;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_fused, CUDA, m) { m.impl("lora_shrink", &lora_shrink_cuda); }

}  // namespace lora_fused
