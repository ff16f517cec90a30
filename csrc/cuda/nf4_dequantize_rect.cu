// Decodes a rectangle [row0, row0 + rows) x [col0, col0 + cols) of an NF4 weight [N, K] into a
// contiguous [rows, cols] tensor: the slab the tiled nf4_linear path feeds to cuBLAS. When K, col0
// and cols are multiples of 8 (every Llama-sized layer), each thread loads 4 packed bytes (8
// elements, one quantization block since blocksize >= 32) per group with kUnroll groups in flight,
// and stores 16 bytes, like nf4_dequantize; otherwise one element per thread.
// The vector kernel is latency-bound (Nsight Compute, session 12: 38% of memory throughput), so:
// a grid of resident blocks striding over the groups (no partial last wave), 32-bit group indices
// (a row slab is contiguous, a column slab divides by the groups per row in 32 bits instead of
// 64), and the double-quantized scale from a shared copy of the nested code table (one global load
// round trip per group instead of two in a row).
#include <ATen/Dispatch.h>

#include "cuda/common.cuh"
#include "cuda/nf4_decode.cuh"

namespace lora_fused {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

template <typename out_t, bool kRowSlab, bool kShareScale>
__global__ void __launch_bounds__(kThreads)
    nf4_dequantize_rect_vec_kernel(const uint8_t* __restrict__ packed, int64_t k, int64_t first,
                                   uint32_t groups_per_row, uint32_t total, int bs_shift, cuda::BlockScales scales,
                                   out_t* __restrict__ out) {
  __shared__ float levels[16];
  __shared__ float code[256];
  if (threadIdx.x < 16) levels[threadIdx.x] = nf4::level(threadIdx.x);
  scales.load_code(code);
  __syncthreads();
  const uint32_t chunk = kThreads * kUnroll, stride = gridDim.x * chunk;
  // kShareScale: the 8 groups of lanes 8j..8j+7 lie in one quantization block (blocksize >= 64, the
  // rectangle block-aligned), so one lane loads the scale and shuffles it to the others (H200,
  // scripts/probe_nf4_dequantize.py: 2-4% faster). The loop bound is the block's, so that every
  // lane of a warp takes part in each shuffle.
  const bool leader = !kShareScale || (threadIdx.x & 7) == 0;
  for (uint32_t start = blockIdx.x * chunk; start < total; start += stride) {
    uint32_t words[kUnroll];
    cuda::BlockScales::Parts parts[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads first
      const uint32_t i = start + u * kThreads + threadIdx.x;
      if (i >= total) continue;
      int64_t flat;  // first element of group i in the weight's flat order
      if (kRowSlab) {
        flat = first + 8 * static_cast<int64_t>(i);
      } else {
        const uint32_t r = i / groups_per_row;
        flat = first + static_cast<int64_t>(r) * k + 8 * static_cast<int64_t>(i - r * groups_per_row);
      }
      words[u] = __ldg(reinterpret_cast<const uint32_t*>(packed + flat / 2));
      if (leader) parts[u] = scales.load(flat >> bs_shift);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t i = start + u * kThreads + threadIdx.x;
      float s = leader && i < total ? scales.finish(parts[u], code) : 0.f;
      if (kShareScale) s = __shfl_sync(0xffffffffu, s, threadIdx.x & 31 & ~7);
      if (i >= total) continue;
      cuda::store8(out + 8 * static_cast<int64_t>(i), words[u], s, levels);
    }
  }
}

template <typename out_t>
__global__ void __launch_bounds__(kThreads)
    nf4_dequantize_rect_scalar_kernel(const uint8_t* __restrict__ packed, int64_t k, int64_t row0, int64_t col0,
                                      int64_t rows, int64_t cols, int bs_shift, cuda::BlockScales scales,
                                      out_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= rows * cols) return;
  const int64_t r = i / cols, c = i - r * cols;
  const int64_t f = (row0 + r) * k + col0 + c;
  const uint8_t b = packed[f >> 1];
  out[i] = static_cast<out_t>(nf4::level((f & 1) ? (b & 15) : (b >> 4)) * scales(f >> bs_shift));
}

}  // namespace

at::Tensor nf4_dequantize_rect_cuda(const Nf4Weight& w, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                                    at::ScalarType dtype, int64_t spare_rows) {
  const char* op = "lora_fused.nf4_dequantize_rect";
  TORCH_CHECK(row0 >= 0 && col0 >= 0 && row0 + rows <= w.out_features && col0 + cols <= w.in_features, op,
              ": rectangle out of range");
  at::Tensor out = at::empty({rows + spare_rows, cols}, w.packed.options().dtype(dtype));
  if (rows * cols == 0) return out;
  const int bs_shift = cuda::log2_exact(w.blocksize);
  TORCH_CHECK(bs_shift >= 0, op, ": blocksize must be a power of two; got ", w.blocksize);
  const cuda::BlockScales scales = cuda::make_block_scales(w);
  const int64_t k = w.in_features;
  const bool vec = k % 8 == 0 && col0 % 8 == 0 && cols % 8 == 0 &&
                   reinterpret_cast<uintptr_t>(w.packed.data_ptr()) % 4 == 0;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const uint8_t* packed = w.packed.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nf4_dequantize_rect_cuda", [&] {
    auto* dst = out.data_ptr<scalar_t>();
    if (vec) {
      const int64_t groups = rows * (cols / 8);
      // Slabs hold at most 2^24 weights (nf4_slab_elems); the 32-bit strided loop needs room above.
      TORCH_CHECK(groups <= (int64_t{1} << 30), op, ": a rectangle of ", rows, " x ", cols,
                  " is more than this kernel decodes at once (2^33 elements)");
      const bool row_slab = col0 == 0 && cols == k;
      const int64_t first = row0 * k + col0;
      // One block per 8 lanes' 64 elements: every group of 8 starts at a multiple of 64.
      const bool share = w.blocksize >= 64 && first % 64 == 0 && (row_slab || (k % 64 == 0 && cols % 64 == 0));
      const auto kernel = row_slab ? (share ? nf4_dequantize_rect_vec_kernel<scalar_t, true, true>
                                            : nf4_dequantize_rect_vec_kernel<scalar_t, true, false>)
                                   : (share ? nf4_dequantize_rect_vec_kernel<scalar_t, false, true>
                                            : nf4_dequantize_rect_vec_kernel<scalar_t, false, false>);
      const int64_t resident =
          static_cast<int64_t>(cuda::resident_blocks_per_sm<nf4_dequantize_rect_vec_kernel<scalar_t, true, true>>(kThreads, 0)) *
          at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      const int64_t grid = std::min(cuda::ceil_div<int64_t>(groups, kThreads * kUnroll), resident);
      kernel<<<static_cast<unsigned int>(grid), kThreads, 0, stream>>>(
          packed, k, first, static_cast<uint32_t>(cols / 8), static_cast<uint32_t>(groups), bs_shift, scales, dst);
    } else {
      const unsigned int grid = cuda::grid_x(cuda::ceil_div<int64_t>(rows * cols, kThreads), op);
      nf4_dequantize_rect_scalar_kernel<scalar_t>
          <<<grid, kThreads, 0, stream>>>(packed, k, row0, col0, rows, cols, bs_shift, scales, dst);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace lora_fused
