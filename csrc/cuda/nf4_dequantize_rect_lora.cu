// Decodes a rectangle of an NF4 weight and adds lora_scale * lora_B @ lora_A to it in the same pass:
// the slab that nf4_linear's tiled path hands to cuBLAS when it merges the LoRA term into the weight
// (x (W + s B A)^T forward, dY (W + s B A) backward). Instead of a decode and then a rank-r GEMM
// over the slab, which reads and writes the whole slab again (11 us per 2688 x 4096 slab on an
// H200, benchmarks/RESULTS.md session 12).
// A grid of resident blocks; each takes a 64-column strip, keeps lora_A's columns of it in shared
// memory (loaded once), and its warps walk the strip's rows 16 at a time with the next tile's codes,
// scales and lora_B rows loaded while the current one is computed: no block-wide wait after the
// start (the first version, one 64 x 64 tile per block with a barrier each, took 25 us per
// 2816 x 4096 slab against 11 for the plain decode). B A comes from mma.sync (m16n8k16, fp32
// accumulators) over r in steps of 16 (zero-padded). The columns of each 8-wide n-tile are permuted
// (operand column n of tile j < 4 is column 8 (n / 2) + 2 j + n % 2 of the strip's 64, of tile j >= 4
// that + 32 - 8) so that the accumulators a lane holds are 8 consecutive columns at 8 t and 8 more
// at 32 + 8 t, in each of two rows: it loads their codes as two 4-byte words and stores two 16-byte
// vectors per row, and each warp store fills whole 32-byte sectors (4 lanes x 16 contiguous bytes).
// Each value is level * scale + s * (B A) in fp32, rounded once.
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/mma_sm80.cuh"
#include "cuda/nf4_decode.cuh"

namespace lora_fused {
namespace {

constexpr int kCols = 64, kThreads = 128, kWarps = kThreads / 32, kMaxRank = 128;

// What one warp needs for one 16-row tile: this lane's codes and scale parts (rows g and g + 8, two
// groups of 8 columns each) and its lora_B fragments (kSteps k-steps of 16).
template <int kSteps>
struct TileLoads {
  uint32_t words[2][2];
  cuda::BlockScales::Parts parts[2][2];
  uint32_t b[kSteps][4];
};

// kVec: lora_A rows loadable as 16-byte vectors and lora_B as pairs (4 bytes) of its rows.
template <typename T, int kSteps, bool kVec>
__device__ __forceinline__ void load_tile(TileLoads<kSteps>& l, int64_t r0, const uint8_t* __restrict__ packed,
                                          int64_t k, int64_t first, int64_t rows, int64_t c0, int bs_shift,
                                          bool share, const cuda::BlockScales& scales, const T* __restrict__ lora_B,
                                          int64_t ldb, int rank, int g, int t) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = r0 + g + 8 * h;
    const bool in = row < rows;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int64_t flat = first + row * k + c0 + 32 * q + 8 * t;
      l.words[h][q] = in ? __ldg(reinterpret_cast<const uint32_t*>(packed + flat / 2)) : 0u;
      // share: the strip's 64 columns of a row are one quantization block.
      if (q == 0 || !share) l.parts[h][q] = in ? scales.load(flat >> bs_shift) : cuda::BlockScales::Parts{0.f, 0u};
      else l.parts[h][q] = l.parts[h][0];
    }
  }
#pragma unroll
  for (int st = 0; st < kSteps; ++st) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {  // a fragment: (row g, col 2t), (g + 8, 2t), (g, 2t + 8), (g + 8, 2t + 8)
      const int64_t row = r0 + g + 8 * (e & 1);
      const int col = 16 * st + 2 * t + 8 * (e >> 1);
      uint32_t v = 0u;
      if (row < rows && col < rank) {
        const T* p = lora_B + row * ldb + col;
        if (kVec) {
          v = __ldg(reinterpret_cast<const uint32_t*>(p));
        } else {
          const uint16_t lo = __ldg(reinterpret_cast<const uint16_t*>(p));
          const uint16_t hi = col + 1 < rank ? __ldg(reinterpret_cast<const uint16_t*>(p + 1)) : uint16_t{0};
          v = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
        }
      }
      l.b[st][e] = v;
    }
  }
}

template <typename T, int kSteps, bool kVec>
__global__ void __launch_bounds__(kThreads, kSteps == 1 ? 7 : 1)
    nf4_dequantize_rect_lora_kernel(const uint8_t* __restrict__ packed, int64_t k, int64_t first, int64_t rows,
                                    int64_t cols, int bs_shift, bool share, cuda::BlockScales scales,
                                    const T* __restrict__ lora_B, int64_t ldb, const T* __restrict__ lora_A,
                                    int64_t lda, int rank, float s, T* __restrict__ out, int strips,
                                    int blocks_per_strip) {
  __shared__ float levels[16];
  __shared__ float code[256];
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int rp = 16 * kSteps;
  // a_s rows an odd number of words, so the transposing stores below are 2-way bank conflicts at
  // most, not 8, and the fragment loads conflict-free.
  constexpr int lda_s = rp + 2;
  T* a_s = reinterpret_cast<T*>(smem_raw);  // [kCols][lda_s]: lora_A's columns of this strip, transposed
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int strip = static_cast<int>(blockIdx.x) % strips, part = static_cast<int>(blockIdx.x) / strips;
  const int64_t c0 = static_cast<int64_t>(strip) * kCols;
  const int64_t tiles = (rows + 15) / 16, step = static_cast<int64_t>(blocks_per_strip) * kWarps;
  int64_t tile = static_cast<int64_t>(part) * kWarps + warp;

  // The first tile's loads fly while lora_A's strip is staged.
  TileLoads<kSteps> cur;
  if (tile < tiles)
    load_tile<T, kSteps, kVec>(cur, 16 * tile, packed, k, first, rows, c0, bs_shift, share, scales, lora_B, ldb, rank, g, t);
  if (threadIdx.x < 16) levels[threadIdx.x] = nf4::level(threadIdx.x);
  scales.load_code(code);
  if (kVec) {
    for (int i = threadIdx.x; i < rank * (kCols / 8); i += kThreads) {
      const int kk = i / (kCols / 8), ch = i - kk * (kCols / 8);
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(lora_A + kk * lda + c0 + 8 * ch));
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int q = 0; q < 8; ++q) a_s[(8 * ch + q) * lda_s + kk] = e[q];
    }
  } else {
    for (int i = threadIdx.x; i < kCols * rank; i += kThreads) {
      const int kk = i / kCols, c = i - kk * kCols;
      a_s[c * lda_s + kk] = lora_A[kk * lda + c0 + c];
    }
  }
  for (int i = threadIdx.x; i < kCols * (rp - rank); i += kThreads) {  // the zero padding up to rp
    const int c = i / (rp - rank), kk = rank + i - c * (rp - rank);
    a_s[c * lda_s + kk] = T(0.0f);
  }
  __syncthreads();

  for (; tile < tiles; tile += step) {
    const int64_t r0 = 16 * tile;
    TileLoads<kSteps> next;
    if (tile + step < tiles)
      load_tile<T, kSteps, kVec>(next, r0 + 16 * step, packed, k, first, rows, c0, bs_shift, share, scales, lora_B,
                                 ldb, rank, g, t);
    float acc[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
    for (int st = 0; st < kSteps; ++st) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const T* pb = a_s + (32 * (j >> 2) + 8 * (g >> 1) + 2 * (j & 3) + (g & 1)) * lda_s + 16 * st + 2 * t;
        cuda::mma16816<T>(acc[j], cur.b[st], *reinterpret_cast<const uint32_t*>(pb),
                          *reinterpret_cast<const uint32_t*>(pb + 8));
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = r0 + g + 8 * h;
      if (row >= rows) continue;
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const float scale = scales.finish(cur.parts[h][q], code);
        alignas(16) uint32_t v[4];
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {  // byte jj: columns 2 jj (high nibble) and 2 jj + 1 of the 8
          const uint32_t b = (cur.words[h][q] >> (8 * jj)) & 0xffu;
          const float* a = acc[4 * q + jj];
          const float e0 = __fmaf_rn(s, a[2 * h], __fmul_rn(levels[b >> 4], scale));
          const float e1 = __fmaf_rn(s, a[2 * h + 1], __fmul_rn(levels[b & 15], scale));
          v[jj] = cuda::pack2<T>(e0, e1);
        }
        *reinterpret_cast<uint4*>(out + row * cols + c0 + 32 * q + 8 * t) = *reinterpret_cast<const uint4*>(v);
      }
    }
    cur = next;
  }
}

}  // namespace

at::Tensor nf4_dequantize_rect_lora_cuda(const Nf4Weight& w, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                                         const at::Tensor& lora_B, const at::Tensor& lora_A, double lora_scale,
                                         int64_t spare_rows) {
  const at::ScalarType dtype = lora_B.scalar_type();
  const int64_t k = w.in_features, rank = lora_A.size(0);
  const bool fits = (dtype == at::kBFloat16 || dtype == at::kHalf) && lora_A.scalar_type() == dtype &&
                    rank <= kMaxRank && k % 8 == 0 && col0 % 8 == 0 && cols % kCols == 0 && rows > 0 &&
                    lora_B.size(0) == rows && lora_A.size(1) == cols &&
                    reinterpret_cast<uintptr_t>(w.packed.data_ptr()) % 4 == 0 &&
                    at::cuda::getCurrentDeviceProperties()->major >= 8 && cuda::log2_exact(w.blocksize) >= 0;
  if (!fits) return at::Tensor();
  // Inner strides of 1 (the slices of contiguous adapters are); anything else is copied, it is small.
  const at::Tensor b = lora_B.stride(1) == 1 ? lora_B : lora_B.contiguous();
  const at::Tensor a = lora_A.stride(1) == 1 ? lora_A : lora_A.contiguous();
  at::Tensor out = at::empty({rows + spare_rows, cols}, w.packed.options().dtype(dtype));
  const int steps = rank <= 16 ? 1 : rank <= 32 ? 2 : rank <= 64 ? 4 : 8;
  const size_t smem = static_cast<size_t>(kCols) * (16 * steps + 2) * 2;  // a_s
  const int strips = static_cast<int>(cols / kCols);
  const int64_t tiles = (rows + 15) / 16;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const cuda::BlockScales scales = cuda::make_block_scales(w);
  const int bs_shift = cuda::log2_exact(w.blocksize);
  const int64_t first = row0 * k + col0;
  // Each row's 64 columns of a strip lie in one quantization block.
  const bool share = w.blocksize >= 64 && first % 64 == 0 && k % 64 == 0;
  const float s = static_cast<float>(lora_scale);
  const bool vec = rank % 2 == 0 && a.stride(0) % 8 == 0 && b.stride(0) % 2 == 0 &&
                   reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(b.data_ptr()) % 4 == 0;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const auto launch = [&](auto tag, auto steps_tag, auto vec_tag) {
    using T = decltype(tag);
    constexpr int kSteps = decltype(steps_tag)::value;
    constexpr bool kVec = decltype(vec_tag)::value;
    const int64_t resident = static_cast<int64_t>(cuda::resident_blocks_per_sm<nf4_dequantize_rect_lora_kernel<T, kSteps, kVec>>(kThreads, smem)) * sms;
    const int64_t per_strip = std::max<int64_t>(
        1, std::min<int64_t>(cuda::ceil_div<int64_t>(tiles, kWarps), resident / std::max(strips, 1)));
    const int64_t grid = per_strip * strips;
    TORCH_CHECK(grid < (int64_t{1} << 31), "lora_fused.nf4_dequantize_rect_lora: ", strips, " strips are too many");
    nf4_dequantize_rect_lora_kernel<T, kSteps, kVec><<<static_cast<unsigned int>(grid), kThreads, smem, stream>>>(
        w.packed.data_ptr<uint8_t>(), k, first, rows, cols, bs_shift, share, scales, b.data_ptr<T>(), b.stride(0),
        a.data_ptr<T>(), a.stride(0), static_cast<int>(rank), s, out.data_ptr<T>(), strips, static_cast<int>(per_strip));
  };
  const auto by_vec = [&](auto tag, auto steps_tag) {
    vec ? launch(tag, steps_tag, std::true_type()) : launch(tag, steps_tag, std::false_type());
  };
  const auto by_steps = [&](auto tag) {
    switch (steps) {
      case 1: by_vec(tag, std::integral_constant<int, 1>()); break;
      case 2: by_vec(tag, std::integral_constant<int, 2>()); break;
      case 4: by_vec(tag, std::integral_constant<int, 4>()); break;
      default: by_vec(tag, std::integral_constant<int, 8>()); break;
    }
  };
  if (dtype == at::kBFloat16) {
    by_steps(at::BFloat16());
  } else {
    by_steps(at::Half());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace lora_fused
