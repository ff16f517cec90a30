// lora_expand on CUDA: out[M, d] = y[M, d] + scale * u[M, r] @ B[d, r]^T.
// Tiling: a block of kCols threads owns kRowsPerBlock rows x kCols columns; ranks are consumed in
// chunks of kChunk through shared memory (B's tile padded by one column so that each thread's
// column read is conflict-free), each thread keeping one fp32 sum per row. Reads and writes of y
// and out are coalesced along d. B may have any strides (the backward passes A^T as a view).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/common.cuh"

namespace lora_fused {
namespace {

constexpr int kCols = 128;
constexpr int kRowsPerBlock = 8;
constexpr int kChunk = 32;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kCols) lora_expand_kernel(const scalar_t* __restrict__ y, int64_t ldy,
                                                             const scalar_t* __restrict__ u, int64_t ldu,
                                                             const scalar_t* __restrict__ b, int64_t b_sd,
                                                             int64_t b_sr, scalar_t* __restrict__ out, int64_t M,
                                                             int64_t D, int64_t R, acc_t scale) {
  __shared__ acc_t su[kRowsPerBlock][kChunk];
  __shared__ acc_t sb[kCols][kChunk + 1];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kCols;
  const int t = threadIdx.x;
  acc_t acc[kRowsPerBlock];
#pragma unroll
  for (int i = 0; i < kRowsPerBlock; ++i) acc[i] = acc_t(0);

  for (int64_t r0 = 0; r0 < R; r0 += kChunk) {
    for (int idx = t; idx < kRowsPerBlock * kChunk; idx += kCols) {
      const int i = idx / kChunk, j = idx % kChunk;
      su[i][j] = m0 + i < M && r0 + j < R ? static_cast<acc_t>(u[(m0 + i) * ldu + r0 + j]) : acc_t(0);
    }
    for (int idx = t; idx < kCols * kChunk; idx += kCols) {
      const int c = idx / kChunk, j = idx % kChunk;
      sb[c][j] = n0 + c < D && r0 + j < R ? static_cast<acc_t>(b[(n0 + c) * b_sd + (r0 + j) * b_sr]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int j = 0; j < kChunk; ++j) {
      const acc_t bv = sb[t][j];
#pragma unroll
      for (int i = 0; i < kRowsPerBlock; ++i) acc[i] = cuda::fma_acc(su[i][j], bv, acc[i]);
    }
    __syncthreads();
  }

  const int64_t n = n0 + t;
  if (n >= D) return;
#pragma unroll
  for (int i = 0; i < kRowsPerBlock; ++i) {
    const int64_t m = m0 + i;
    if (m < M) out[m * D + n] = static_cast<scalar_t>(static_cast<acc_t>(y[m * ldy + n]) + scale * acc[i]);
  }
}

at::Tensor lora_expand_cuda(const at::Tensor& y_in, const at::Tensor& u_in, const at::Tensor& lora_b, double scale) {
  check_lora_expand_args(y_in, u_in, lora_b);
  check_device(y_in, at::kCUDA, "lora_fused.lora_expand", "y");
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.stride(1) == 1 ? y_in : y_in.contiguous();
  const at::Tensor u = u_in.stride(1) == 1 ? u_in : u_in.contiguous();
  const int64_t M = y.size(0), D = y.size(1), R = u.size(1);
  at::Tensor out = at::empty({M, D}, y.options());
  if (M == 0 || D == 0) return out;
  const dim3 grid(cuda::grid_x(cuda::ceil_div<int64_t>(M, kRowsPerBlock), "lora_fused.lora_expand"),
                  static_cast<unsigned int>(cuda::ceil_div<int64_t>(D, kCols)));
  TORCH_CHECK(grid.y <= 65535u, "lora_fused.lora_expand: d = ", D, " is larger than supported (", 65535LL * kCols, ")");
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "lora_expand_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    lora_expand_kernel<scalar_t, acc_t><<<grid, kCols, 0, stream>>>(
        y.data_ptr<scalar_t>(), y.stride(0), u.data_ptr<scalar_t>(), u.stride(0), lora_b.data_ptr<scalar_t>(),
        lora_b.stride(0), lora_b.stride(1), out.data_ptr<scalar_t>(), M, D, R, static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_fused, CUDA, m) { m.impl("lora_expand", &lora_expand_cuda); }

}  // namespace lora_fused
