// The LoRA shrink of the decode kernels (lora_shrink_partials.h): x @ lora_A^T for M <= 16 tokens
// as partial sums over slices of K that the decode kernel adds (in split order, so the result does
// not depend on timing) and scales. Launched just before it, which may start while this one runs
// (programmatic dependent launch, sm_90): the shrink then costs its few blocks' time on a few SMs
// instead of two kernels (mm, scale) in the decode's critical path.
//
// Block (split, tile): ranks 8 tile .. 8 tile + 7 over the split's slice of K (at most
// kLoraShrinkMaxSplits slices of at least kLoraShrinkSplitCols columns, 4x that with 32-warp blocks, so
// that the decode kernel has few partial sums to load); its warps take every kWarps-th 32-column chunk of the slice, two
// mma.m16n8k16 each (x as the A operand, tokens past M reading token 0 and never stored; ranks past
// r reading rank r - 1, never stored), the 16-byte loads of 4 chunks in flight at once. The warps'
// sums meet in shared memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

#include "cuda/common.cuh"
#include "cuda/mma_sm80.cuh"
#include "cuda/lora_shrink_partials.h"
#include "cuda/pdl.cuh"

namespace lora_fused {
namespace cuda {
namespace {

constexpr int kChunksPerWarp = 4;  // of 32 columns, per batch

// Columns of K a block of kWarps warps takes in one batch: a slice is at least one batch.
template <int kWarps>
constexpr int batch_cols() {
  return 32 * kChunksPerWarp * kWarps;
}
static_assert(batch_cols<8>() == kLoraShrinkSplitCols, "8-warp slices are kLoraShrinkSplitCols wide (the header says)");

// kWarps: 8, or 32 (lora_shrink_wide): a split's 4096 columns in one batch on one SM, so that the
// shrink takes fewer of the SMs that the decode kernel's blocks (one an SM) would start on.
template <typename T, int kWarps>
__global__ void __launch_bounds__(32 * kWarps, 1) lora_shrink_partials_kernel(const T* __restrict__ x,
                                                                                const T* __restrict__ lora_A,
                                                                                float* __restrict__ parts, int m,
                                                                                int r, int k, int64_t ldx) {
  pdl_launch_dependents();  // the decode kernel waits for this grid's completion where it reads parts
  __shared__ float red[kWarps][16][8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int split = blockIdx.x, tile = blockIdx.y;
  const int rank = min(8 * tile + g, r - 1);
  const T* x0 = x + (g < m ? g : 0) * ldx + 8 * t;
  const T* x8 = x + (g + 8 < m ? g + 8 : 0) * ldx + 8 * t;
  const T* ar = lora_A + static_cast<int64_t>(rank) * k + 8 * t;
  const int chunks = k / 32, per_split = (chunks + gridDim.x - 1) / gridDim.x;
  const int end = min(chunks, (split + 1) * per_split);
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int first = split * per_split + warp; first < end; first += kWarps * kChunksPerWarp) {
    // A batch's loads first (chunks past the slice read chunk 0 and multiply by zero), then its mmas.
    uint4 xa[kChunksPerWarp], xb[kChunksPerWarp], av[kChunksPerWarp];
#pragma unroll
    for (int i = 0; i < kChunksPerWarp; ++i) {
      const int kc = first + kWarps * i, col = 32 * (kc < end ? kc : 0);
      xa[i] = load_nc16(x0 + col);
      xb[i] = load_nc16(x8 + col);
      av[i] = load_nc16(ar + col);
    }
#pragma unroll
    for (int i = 0; i < kChunksPerWarp; ++i) {
      const bool ok = first + kWarps * i < end;
      // Lane t's logical k {2t, 2t+1, 2t+8, 2t+9} are physical columns 8t + {0..3} in the first mma
      // and 8t + {4..7} in the second (an mma sums its k in any order; x and lora_A use the same map).
      const uint32_t a0[4] = {xa[i].x, xb[i].x, xa[i].y, xb[i].y}, a1[4] = {xa[i].z, xb[i].z, xa[i].w, xb[i].w};
      mma16816<T>(c, a0, ok ? av[i].x : 0u, ok ? av[i].y : 0u);
      mma16816<T>(c, a1, ok ? av[i].z : 0u, ok ? av[i].w : 0u);
    }
  }
  // c: tokens g (c[0], c[1]) and g + 8 (c[2], c[3]), ranks 8 tile + 2t + {0, 1}.
  red[warp][g][2 * t] = c[0];
  red[warp][g][2 * t + 1] = c[1];
  red[warp][g + 8][2 * t] = c[2];
  red[warp][g + 8][2 * t + 1] = c[3];
  __syncthreads();
  if (threadIdx.x < 128) {
    const int tok = threadIdx.x >> 3, q = threadIdx.x & 7;
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += red[w][tok][q];
    if (tok < m && 8 * tile + q < r) parts[(static_cast<int64_t>(split) * m + tok) * r + 8 * tile + q] = v;
  }
}

}  // namespace

// Blocks of 32 warps (LORA_FUSED_LORA_SHRINK_WARPS=32, the default) or of 8 (=8, comparisons).
bool lora_shrink_wide() {
  const char* v = std::getenv("LORA_FUSED_LORA_SHRINK_WARPS");
  if (v == nullptr || *v == '\0') return true;
  const std::string s(v);
  TORCH_CHECK(s == "8" || s == "32", "LORA_FUSED_LORA_SHRINK_WARPS must be 8 or 32 (warps a block of the LoRA shrink), got '",
              s, "'");
  return s == "32";
}

int lora_shrink_splits(int64_t k) {
  const int cols = lora_shrink_wide() ? batch_cols<32>() : batch_cols<8>();
  return static_cast<int>(std::min<int64_t>(ceil_div<int64_t>(k, cols), kLoraShrinkMaxSplits));
}

template <typename T, int kWarps>
static void launch_shrink(const void* x, int64_t ldx, const void* lora_A, float* parts, int m, int r, int64_t k, cudaStream_t stream) {
  const dim3 grid(lora_shrink_splits(k), static_cast<unsigned>(ceil_div(r, 8)));
  lora_shrink_partials_kernel<T, kWarps><<<grid, 32 * kWarps, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(lora_A), parts, m, r, static_cast<int>(k), ldx);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void lora_shrink_partials_launch(const void* x, int64_t ldx, const void* lora_A, float* parts, int m, int r, int64_t k,
                                 at::ScalarType dtype, cudaStream_t stream) {
  const bool wide = lora_shrink_wide();
  if (dtype == at::kBFloat16) {
    (wide ? launch_shrink<at::BFloat16, 32> : launch_shrink<at::BFloat16, 8>)(x, ldx, lora_A, parts, m, r, k, stream);
  } else {
    (wide ? launch_shrink<at::Half, 32> : launch_shrink<at::Half, 8>)(x, ldx, lora_A, parts, m, r, k, stream);
  }
}

}  // namespace cuda
}  // namespace lora_fused
