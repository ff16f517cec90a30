// out += u @ v (+ bias) in place for a low-rank product (u [M, r], v [r, N], r <= 64), bf16/fp16:
// the LoRA term added once the base GEMMs have written out, one streaming pass over out. It
// replaces the LoRA term as the base GEMMs' accumulator (cuBLAS with beta = 1 after a K = r GEMM
// wrote u v): on an H200 at 4096->11008, M = 4096 that cost 82 us of beta = 1 over the slab GEMMs
// plus 45 us for the K = r GEMM (benchmarks/RESULTS.md, session 15).
// A block owns 256 columns (v's tile kept in shared memory as fp32 for all its rows) and walks
// row tiles of 32 (u's tile in shared memory); lane l holds columns [4l, 4l + 4) and
// [128 + 4l, 128 + 4l + 4) of the tile for 4 rows, so each shared read of v is a conflict-free
// 16-byte vector and each global access of out is 8 bytes per lane, 256 contiguous bytes per warp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/common.cuh"
#include "gemm.h"

namespace lora_fused {
namespace cuda {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kCols = 256, kColsPad = kCols + 4;  // +4: v's transposed fill spreads over banks
constexpr int kRowsPerWarp = 4, kRows = kWarps * kRowsPerWarp;
constexpr int kMaxRank = 64;

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

template <typename T>
__global__ void __launch_bounds__(kThreads)
    add_low_rank_kernel(T* __restrict__ out, int64_t ld_out, const T* __restrict__ u, int64_t ld_u,
                        const T* __restrict__ v, int64_t v_sr, int64_t v_sc, const T* __restrict__ bias, int64_t m,
                        int64_t n, int r) {
  extern __shared__ float smem[];
  float* sv = smem;                   // [r][kColsPad]: v's column tile
  float* su = smem + r * kColsPad;    // [kRows][r]: u's row tile
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kCols;
  for (int idx = t; idx < r * kCols; idx += kThreads) {
    // Along v's unit stride: rows of v [r, N] (A), or the ranks of one column (B^T, a view of B [N, r]).
    int j, c;
    if (v_sc == 1) {
      j = idx / kCols, c = idx % kCols;
    } else {
      c = idx / r, j = idx % r;
    }
    sv[j * kColsPad + c] = n0 + c < n ? to_float(v[j * v_sr + (n0 + c) * v_sc]) : 0.f;
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
  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRows; m0 < m; m0 += static_cast<int64_t>(gridDim.y) * kRows) {
    Vec4<T> y[kRowsPerWarp][2];  // out's current values, loaded before the wait below
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int64_t row = m0 + warp * kRowsPerWarp + i;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        y[i][h].raw = live[h] && row < m ? *reinterpret_cast<const uint2*>(out + row * ld_out + cols[h]) : uint2{0u, 0u};
      }
    }
    __syncthreads();  // the previous tile's reads of su are done
    for (int idx = t; idx < kRows * r; idx += kThreads) {
      const int i = idx / r, j = idx % r;
      su[idx] = m0 + i < m ? to_float(u[(m0 + i) * ld_u + j]) : 0.f;
    }
    __syncthreads();
    float acc[kRowsPerWarp][2][4] = {};
    const float* urow = su + warp * kRowsPerWarp * r;
    for (int j = 0; j < r; ++j) {
      const float4 v0 = *reinterpret_cast<const float4*>(sv + j * kColsPad + 4 * lane);
      const float4 v1 = *reinterpret_cast<const float4*>(sv + j * kColsPad + kCols / 2 + 4 * lane);
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const float uv = urow[i * r + j];
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
      const int64_t row = m0 + warp * kRowsPerWarp + i;
      if (row >= m) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (!live[h]) continue;
        Vec4<T> o;
#pragma unroll
        for (int e = 0; e < 4; ++e) o.set(e, y[i][h].get(e) + (acc[i][h][e] + b[h][e]));
        *reinterpret_cast<uint2*>(out + row * ld_out + cols[h]) = o.raw;
      }
    }
  }
}

bool aligned8(const void* p) { return reinterpret_cast<uintptr_t>(p) % 8 == 0; }

template <typename T>
void launch(const at::Tensor& out, const at::Tensor& u, const at::Tensor& v, const c10::optional<at::Tensor>& bias,
            dim3 grid, size_t smem) {
  opt_in_dynamic_smem<add_low_rank_kernel<T>>((static_cast<size_t>(kMaxRank) * kColsPad + kRows * kMaxRank) * sizeof(float));
  add_low_rank_kernel<T><<<grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<T*>(out.data_ptr()), out.stride(0), reinterpret_cast<const T*>(u.data_ptr()), u.stride(0),
      reinterpret_cast<const T*>(v.data_ptr()), v.stride(0), v.stride(1),
      bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr, out.size(0), out.size(1),
      static_cast<int>(u.size(1)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool add_low_rank(const at::Tensor& out, const at::Tensor& u, const at::Tensor& v, const c10::optional<at::Tensor>& bias) {
  const at::ScalarType t = out.scalar_type();
  if (t != at::kBFloat16 && t != at::kHalf) return false;
  const int64_t m = out.size(0), n = out.size(1), r = u.size(1);
  if (m == 0 || n == 0) return true;
  if (r < 1 || r > kMaxRank || n % 4 != 0 || out.stride(1) != 1 || out.stride(0) % 4 != 0 ||
      !aligned8(out.data_ptr()) || u.stride(1) != 1 || u.scalar_type() != t || v.scalar_type() != t)
    return false;
  if (bias.has_value() && (bias->scalar_type() != t || bias->stride(0) != 1)) return false;
  const c10::cuda::CUDAGuard guard(out.device());
  const size_t smem = (static_cast<size_t>(r) * kColsPad + static_cast<size_t>(kRows) * r) * sizeof(float);
  const int64_t col_tiles = ceil_div<int64_t>(n, kCols), row_tiles = ceil_div<int64_t>(m, kRows);
  // About four blocks per SM in all; each block keeps its v tile for every row tile it walks.
  const int64_t want = 4LL * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t splits = std::min<int64_t>(row_tiles, std::max<int64_t>(1, ceil_div<int64_t>(want, col_tiles)));
  TORCH_CHECK(col_tiles <= 0x7fffffffLL && splits <= 65535, "lora_fused: add_low_rank grid out of range");
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(splits));
  if (t == at::kBFloat16) {
    launch<__nv_bfloat16>(out, u, v, bias, grid, smem);
  } else {
    launch<__half>(out, u, v, bias, grid, smem);
  }
  return true;
}

}  // namespace cuda
}  // namespace lora_fused
