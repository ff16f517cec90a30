// out += u @ v (+ bias) in place for a low-rank product (u [M, r], v [r, N], r <= 32), bf16/fp16:
// the LoRA term added once the base GEMMs have written out, one streaming pass over out. It
// replaces the LoRA term as the base GEMMs' accumulator (cuBLAS with beta = 1 after a K = r GEMM
// wrote u v): on an H200 at 4096->11008, M = 4096 that cost 82 us of beta = 1 over the slab GEMMs
// plus 45 us for the K = r GEMM (benchmarks/RESULTS.md, session 15).
// A block owns 256 columns (v's tile kept in shared memory as fp32) and its warps walk rows 4 at a
// time, each on its own; lane l holds columns [4l, 4l + 4) and [128 + 4l, 128 + 4l + 4) of the tile,
// so each shared read of v is a conflict-free 16-byte vector and each global access of out is 8
// bytes per lane, 256 contiguous bytes per warp; lane j holds u[row][j], shuffled to the others.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "cuda/common.cuh"
#include "gemm.h"

namespace lora_fused {
namespace cuda {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kCols = 256, kColsPad = kCols + 4;  // +4: v's transposed fill spreads over banks
constexpr int kRowsPerWarp = 4;
constexpr int kMaxRank = 32;  // above, r FMAs per element outrun the memory stream: cuBLAS instead

// The build has torch's __CUDA_NO_*_CONVERSIONS__: converting by name.
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <typename T>
struct Vec4 {  // 4 elements of out as one 8-byte access
  uint2 raw;
  __device__ __forceinline__ float get(int i) const { return to_float(reinterpret_cast<const T*>(&raw)[i]); }
  __device__ __forceinline__ void set(int i, float v) { reinterpret_cast<T*>(&raw)[i] = from_float<T>(v); }
};

// Rows [row, row + kRowsPerWarp) of out at the lane's columns, and lane j's u[row + i][j].
template <typename T>
struct RowTile {
  Vec4<T> y[kRowsPerWarp][2];
  float u[kRowsPerWarp];
  __device__ __forceinline__ void load(const T* out, int64_t ld_out, const T* u_, int64_t ld_u, int64_t row, int64_t m,
                                       int r, const int64_t* cols, const bool* live, int lane) {
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const bool in = row + i < m;
#pragma unroll
      for (int h = 0; h < 2; ++h)
        y[i][h].raw = in && live[h] ? *reinterpret_cast<const uint2*>(out + (row + i) * ld_out + cols[h]) : uint2{0u, 0u};
      u[i] = in && lane < r ? to_float(u_[(row + i) * ld_u + lane]) : 0.f;
    }
  }
};

// kR: the rank rounded up to 8, 16 or 32 (v's tile zero-padded), so the rank loop unrolls.
template <typename T, int kR>
__global__ void __launch_bounds__(kThreads)
    add_low_rank_kernel(T* __restrict__ out, int64_t ld_out, const T* __restrict__ u, int64_t ld_u,
                        const T* __restrict__ v, int64_t v_sr, int64_t v_sc, const T* __restrict__ bias, int64_t m,
                        int64_t n, int r) {
  __shared__ __align__(16) float sv[kR][kColsPad];  // v's column tile, fp32
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kCols;
  for (int idx = t; idx < kR * kCols; idx += kThreads) {
    // Along v's unit stride: rows of v [r, N] (A), or the ranks of one column (B^T, a view of B [N, r]).
    int j, c;
    if (v_sc == 1) {
      j = idx / kCols, c = idx % kCols;
    } else {
      c = idx / kR, j = idx % kR;
    }
    sv[j][c] = n0 + c < n && j < r ? to_float(v[j * v_sr + (n0 + c) * v_sc]) : 0.f;
  }
  int64_t cols[2];
  bool live[2];
  float b[2][4];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    cols[h] = n0 + h * (kCols / 2) + 4 * lane;
    live[h] = cols[h] < n;  // n % 4 == 0: a live group of 4 is whole
#pragma unroll
    for (int i = 0; i < 4; ++i) b[h][i] = bias != nullptr && live[h] ? to_float(bias[cols[h] + i]) : 0.f;
  }
  __syncthreads();
  // Each warp walks its own row tiles (no block-wide waits), the next tile's loads in flight
  // while the current one is computed; the loop bound is per warp, so every shuffle has all lanes.
  const int64_t step = static_cast<int64_t>(gridDim.y) * kWarps * kRowsPerWarp;
  int64_t row = (static_cast<int64_t>(blockIdx.y) * kWarps + warp) * kRowsPerWarp;
  RowTile<T> cur;
  cur.load(out, ld_out, u, ld_u, row, m, r, cols, live, lane);
  for (; row < m; row += step) {
    RowTile<T> next;
    next.load(out, ld_out, u, ld_u, row + step, m, r, cols, live, lane);
    float acc[kRowsPerWarp][2][4] = {};
#pragma unroll
    for (int j = 0; j < kR; ++j) {
      const float4 v0 = *reinterpret_cast<const float4*>(&sv[j][4 * lane]);
      const float4 v1 = *reinterpret_cast<const float4*>(&sv[j][kCols / 2 + 4 * lane]);
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const float uv = __shfl_sync(0xffffffffu, cur.u[i], j);
        acc[i][0][0] = fma_acc(uv, v0.x, acc[i][0][0]);
        acc[i][0][1] = fma_acc(uv, v0.y, acc[i][0][1]);
        acc[i][0][2] = fma_acc(uv, v0.z, acc[i][0][2]);
        acc[i][0][3] = fma_acc(uv, v0.w, acc[i][0][3]);
        acc[i][1][0] = fma_acc(uv, v1.x, acc[i][1][0]);
        acc[i][1][1] = fma_acc(uv, v1.y, acc[i][1][1]);
        acc[i][1][2] = fma_acc(uv, v1.z, acc[i][1][2]);
        acc[i][1][3] = fma_acc(uv, v1.w, acc[i][1][3]);
      }
    }
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      if (row + i >= m) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (!live[h]) continue;
        Vec4<T> o;
#pragma unroll
        for (int e = 0; e < 4; ++e) o.set(e, cur.y[i][h].get(e) + (acc[i][h][e] + b[h][e]));
        *reinterpret_cast<uint2*>(out + (row + i) * ld_out + cols[h]) = o.raw;
      }
    }
    cur = next;
  }
}

bool aligned8(const void* p) { return reinterpret_cast<uintptr_t>(p) % 8 == 0; }

template <typename T, int kR>
void launch(const at::Tensor& out, const at::Tensor& u, const at::Tensor& v, const c10::optional<at::Tensor>& bias) {
  const int64_t m = out.size(0), n = out.size(1);
  const auto kernel = add_low_rank_kernel<T, kR>;
  static const int per_sm = [&] {
    int b = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, kernel, kThreads, 0));
    return std::max(b, 1);
  }();
  // A resident grid: each block keeps its v tile for every row tile its warps walk.
  const int64_t resident = static_cast<int64_t>(per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t col_tiles = ceil_div<int64_t>(n, kCols);
  const int64_t row_groups = ceil_div<int64_t>(m, kWarps * kRowsPerWarp);
  const int64_t splits = std::min<int64_t>({row_groups, std::max<int64_t>(1, resident / col_tiles), 65535});
  TORCH_CHECK(col_tiles <= 0x7fffffffLL, "lora_fused: add_low_rank: ", n, " columns are more than a grid holds");
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(splits));
  kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<T*>(out.data_ptr()), out.stride(0), reinterpret_cast<const T*>(u.data_ptr()), u.stride(0),
      reinterpret_cast<const T*>(v.data_ptr()), v.stride(0), v.stride(1),
      bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr, m, n, static_cast<int>(u.size(1)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_rank(const at::Tensor& out, const at::Tensor& u, const at::Tensor& v, const c10::optional<at::Tensor>& bias) {
  const int64_t r = u.size(1);
  if (r <= 8) return launch<T, 8>(out, u, v, bias);
  if (r <= 16) return launch<T, 16>(out, u, v, bias);
  return launch<T, 32>(out, u, v, bias);
}

}  // namespace

bool add_low_rank_takes(at::ScalarType t, int64_t n, int64_t r) {
  return (t == at::kBFloat16 || t == at::kHalf) && r >= 1 && r <= kMaxRank && n % 4 == 0;
}

namespace {

bool add_low_rank_applies(const at::Tensor& out, int64_t r) {
  return out.is_cuda() && out.dim() == 2 && add_low_rank_takes(out.scalar_type(), out.size(1), r) &&
         out.stride(1) == 1 && out.stride(0) % 4 == 0 && aligned8(out.data_ptr());
}

}  // namespace

bool add_low_rank(const at::Tensor& out, const at::Tensor& u, const at::Tensor& v, const c10::optional<at::Tensor>& bias) {
  const at::ScalarType t = out.scalar_type();
  if (!add_low_rank_applies(out, u.size(1)) || u.stride(1) != 1 || u.scalar_type() != t || v.scalar_type() != t)
    return false;
  if (bias.has_value() && (bias->scalar_type() != t || bias->stride(0) != 1)) return false;
  if (out.numel() == 0) return true;
  const c10::cuda::CUDAGuard guard(out.device());
  if (t == at::kBFloat16) {
    launch_rank<__nv_bfloat16>(out, u, v, bias);
  } else {
    launch_rank<__half>(out, u, v, bias);
  }
  return true;
}

}  // namespace cuda
}  // namespace lora_fused
