// lora_decode on CUDA: out[M, d] = x @ W^T + scale * (x @ A^T) @ B^T + bias, for decode batches
// (M <= 16), where the layer is a matrix-vector product bound by streaming W once.
// u = x @ A^T comes from one small cuBLAS GEMM; the kernel then streams W with 16-byte loads:
// a warp owns kRowsPerWarp output features and walks their rows, the block's x is staged in shared
// memory kChunk columns at a time, and scale * u sits in shared memory so the LoRA term joins the
// same fp32 accumulators before one warp reduction and a single rounding. Other shapes (M > 16,
// fp32, k % 8 != 0, misaligned) take the composed path (cuBLAS GEMMs), which is equally correct.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/common.cuh"
#include "lora_linear_composed.h"

namespace lora_fused {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kChunk = 512;   // x columns staged per pass: 16 rows x 512 x 2 B = 16 KB
constexpr int kMaxRank = 256;  // scale * u in shared memory: 16 x 256 x 4 B = 16 KB
constexpr int kMaxM = 16;

__device__ __forceinline__ float2 unpack2(uint32_t v, at::BFloat16) {
  return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}
__device__ __forceinline__ float2 unpack2(uint32_t v, at::Half) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}

// acc += dot(w[0:8], x[0:8]) for 8 packed 16-bit values each.
template <typename T>
__device__ __forceinline__ float dot8(const uint4& w, const uint4& x, float acc) {
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(&w);
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(&x);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = unpack2(wp[i], T()), b = unpack2(xp[i], T());
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
  return acc;
}

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads)
    lora_decode_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ w, int64_t ldw,
                       const T* __restrict__ u, int64_t ldu, const T* __restrict__ b, int64_t b_sd, int64_t b_sr,
                       const T* __restrict__ bias, T* __restrict__ out, int M, int64_t K, int64_t D, int R,
                       float scale) {
  __shared__ alignas(16) T xs[MT][kChunk];
  __shared__ float us[MT][kMaxRank];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp * kRowsPerWarp;

  for (int i = threadIdx.x; i < MT * R; i += kThreads) {
    const int m = i / R, j = i % R;
    us[m][j] = m < M ? static_cast<float>(u[m * ldu + j]) * scale : 0.0f;
  }
  float acc[kRowsPerWarp][MT];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[rr][m] = 0.0f;

  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int kc = static_cast<int>(K - k0 < kChunk ? K - k0 : kChunk);  // a multiple of 8
    __syncthreads();  // the previous chunk is consumed
    for (int i = threadIdx.x; i < MT * (kc / 8); i += kThreads) {
      const int m = i / (kc / 8), c = (i % (kc / 8)) * 8;
      *reinterpret_cast<uint4*>(&xs[m][c]) =
          m < M ? *reinterpret_cast<const uint4*>(x + m * ldx + k0 + c) : zero;
    }
    __syncthreads();
    // Two 16-byte segments per row per step, so each lane keeps 2 x kRowsPerWarp loads in flight.
    for (int c = lane * 8; c < kc; c += 2 * 32 * 8) {
      const int c2 = c + 32 * 8;
      uint4 wv[2][kRowsPerWarp];
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int64_t n = n0 + rr;
        const T* row = w + n * ldw + k0;
        wv[0][rr] = n < D ? __ldg(reinterpret_cast<const uint4*>(row + c)) : zero;
        wv[1][rr] = n < D && c2 < kc ? __ldg(reinterpret_cast<const uint4*>(row + c2)) : zero;
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const uint4 x0 = *reinterpret_cast<const uint4*>(&xs[m][c]);
        const uint4 x1 = c2 < kc ? *reinterpret_cast<const uint4*>(&xs[m][c2]) : zero;
#pragma unroll
        for (int rr = 0; rr < kRowsPerWarp; ++rr) acc[rr][m] = dot8<T>(wv[1][rr], x1, dot8<T>(wv[0][rr], x0, acc[rr][m]));
      }
    }
  }

  // The LoRA term: lanes split the rank, into the same accumulators.
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t n = n0 + rr;
    if (n >= D) continue;
    for (int j = lane; j < R; j += 32) {
      const float bv = static_cast<float>(b[n * b_sd + j * b_sr]);
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[rr][m] = fmaf(us[m][j], bv, acc[rr][m]);
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t n = n0 + rr;
    const float bn = bias != nullptr && n < D ? static_cast<float>(bias[n]) : 0.0f;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float v = cuda::warp_sum(acc[rr][m]);  // every lane holds the sum
      if (lane == m && m < M && n < D) out[m * D + n] = static_cast<T>(v + bn);
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int MT>
void launch(const at::Tensor& x, const at::Tensor& w, const at::Tensor& u, const at::Tensor& b,
            const c10::optional<at::Tensor>& bias, at::Tensor& out, double scale) {
  const int64_t D = w.size(0);
  const unsigned int grid = cuda::grid_x(cuda::ceil_div<int64_t>(D, kRowsPerBlock), "lora_fused.lora_decode");
  lora_decode_kernel<T, MT><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<T>(), x.stride(0), w.data_ptr<T>(), w.stride(0), u.data_ptr<T>(), u.stride(0), b.data_ptr<T>(),
      b.stride(0), b.stride(1), bias.has_value() ? bias->data_ptr<T>() : nullptr, out.data_ptr<T>(),
      static_cast<int>(x.size(0)), x.size(1), D, static_cast<int>(u.size(1)), static_cast<float>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor lora_decode_cuda(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, double scale, const c10::optional<at::Tensor>& bias) {
  check_lora_linear_args(x_in, weight, lora_a, lora_b, bias, "lora_fused.lora_decode");
  check_device(x_in, at::kCUDA, "lora_fused.lora_decode", "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), R = lora_a.size(0);
  const auto dt = x.scalar_type();
  const bool fast = M >= 1 && M <= kMaxM && R <= kMaxRank && (dt == at::kBFloat16 || dt == at::kHalf) &&
                    K % 8 == 0 && x.stride(0) % 8 == 0 && aligned16(x.data_ptr()) && weight.stride(1) == 1 &&
                    weight.stride(0) % 8 == 0 && aligned16(weight.data_ptr());
  if (!fast) return lora_linear_composed(x, weight, lora_a, lora_b, scale, bias);
  const at::Tensor u = at::mm(x, lora_a.t());  // [M, r], cuBLAS
  at::Tensor out = at::empty({M, weight.size(0)}, x.options());
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dt, "lora_decode_cuda", [&] {
    if (M == 1) launch<scalar_t, 1>(x, weight, u, lora_b, bias, out, scale);
    else if (M <= 2) launch<scalar_t, 2>(x, weight, u, lora_b, bias, out, scale);
    else if (M <= 4) launch<scalar_t, 4>(x, weight, u, lora_b, bias, out, scale);
    else if (M <= 8) launch<scalar_t, 8>(x, weight, u, lora_b, bias, out, scale);
    else launch<scalar_t, 16>(x, weight, u, lora_b, bias, out, scale);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_fused, CUDA, m) { m.impl("lora_decode", &lora_decode_cuda); }

}  // namespace lora_fused
