// Decodes a rectangle of an NF4 weight and adds lora_scale * lora_B @ lora_A to it in the same pass:
// the slab that nf4_linear's tiled path hands to cuBLAS when it merges the LoRA term into the weight
// (x (W + s B A)^T forward, dY (W + s B A) backward). Instead of a decode and then a rank-r GEMM
// over the slab, which reads and writes the whole slab again (11 us per 2688 x 4096 slab on an
// H200, benchmarks/RESULTS.md session 12).
// A block covers 64 rows x 64 columns, each warp 16 rows; B A comes from mma.sync (m16n8k16, fp32
// accumulators) over r in steps of 16 (zero-padded). The columns of each 8-wide n-tile are permuted
// (operand column n of tile j < 4 is column 8 (n / 2) + 2 j + n % 2 of the block's 64, of tile j >= 4
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

constexpr int kRows = 64, kCols = 64, kThreads = 128, kMaxRank = 128;

// kVec: r, the adapters' row strides and pointers multiples of 8 elements (16 bytes).
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    nf4_dequantize_rect_lora_kernel(const uint8_t* __restrict__ packed, int64_t k, int64_t first, int64_t rows,
                                    int64_t cols, int bs_shift, cuda::BlockScales scales, const T* __restrict__ lora_B,
                                    int64_t ldb, const T* __restrict__ lora_A, int64_t lda, int rank, float s,
                                    T* __restrict__ out) {
  __shared__ float levels[16];
  __shared__ float code[256];
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // Padded rows: ld keeps b_s rows 16-byte aligned with conflict-free A fragments; a_s rows an odd
  // number of words, so the transposing stores below are 2-way bank conflicts at most, not 8.
  const int rp = (rank + 15) & ~15, ld = rp + 8, lda_s = rp + 2;
  T* b_s = reinterpret_cast<T*>(smem_raw);  // [kRows][ld]: lora_B's rows of this block
  T* a_s = b_s + kRows * ld;                // [kCols][lda_s]: lora_A's columns, transposed
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRows, c0 = static_cast<int64_t>(blockIdx.x) * kCols;

  // The codes and scale parts of this lane's two rows (two groups of 8 columns each) first: they fly while the
  // LoRA tiles load.
  uint32_t words[2][2];
  cuda::BlockScales::Parts parts[2][2];  // the two groups of 8 may sit in two blocks (blocksize 32)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = r0 + 16 * warp + g + 8 * h;
    if (row >= rows) continue;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int64_t flat = first + row * k + c0 + 32 * q + 8 * t;
      words[h][q] = __ldg(reinterpret_cast<const uint32_t*>(packed + flat / 2));
      parts[h][q] = scales.load(flat >> bs_shift);
    }
  }
  if (threadIdx.x < 16) levels[threadIdx.x] = nf4::level(threadIdx.x);
  scales.load_code(code);
  if (kVec) {  // 16-byte loads: at r = 16 one of lora_B and one of lora_A per thread
    const int chunks = rank / 8;
#pragma unroll 2
    for (int i = threadIdx.x; i < kRows * chunks; i += kThreads) {
      const int rr = i / chunks, ch = i - rr * chunks;
      const uint4 v = r0 + rr < rows ? __ldg(reinterpret_cast<const uint4*>(lora_B + (r0 + rr) * ldb + 8 * ch))
                                     : make_uint4(0u, 0u, 0u, 0u);
      *reinterpret_cast<uint4*>(b_s + rr * ld + 8 * ch) = v;
    }
#pragma unroll 2
    for (int i = threadIdx.x; i < rank * (kCols / 8); i += kThreads) {
      const int kk = i / (kCols / 8), ch = i - kk * (kCols / 8);
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(lora_A + kk * lda + c0 + 8 * ch));
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int q = 0; q < 8; ++q) a_s[(8 * ch + q) * lda_s + kk] = e[q];
    }
  } else {
#pragma unroll 4
    for (int i = threadIdx.x; i < kRows * rank; i += kThreads) {
      const int rr = i / rank, kk = i - rr * rank;
      b_s[rr * ld + kk] = r0 + rr < rows ? lora_B[(r0 + rr) * ldb + kk] : T(0.0f);
    }
#pragma unroll 4
    for (int i = threadIdx.x; i < kCols * rank; i += kThreads) {
      const int kk = i / kCols, c = i - kk * kCols;
      a_s[c * lda_s + kk] = lora_A[kk * lda + c0 + c];
    }
  }
  for (int i = threadIdx.x; i < kRows * (rp - rank); i += kThreads) {  // the zero padding up to rp
    const int rr = i / (rp - rank), kk = rank + i - rr * (rp - rank);
    b_s[rr * ld + kk] = T(0.0f);
    a_s[rr * lda_s + kk] = T(0.0f);  // kRows == kCols
  }
  __syncthreads();

  float acc[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  for (int kk = 0; kk < rp; kk += 16) {
    const T* pa = b_s + (16 * warp + g) * ld + kk + 2 * t;
    const uint32_t a[4] = {*reinterpret_cast<const uint32_t*>(pa), *reinterpret_cast<const uint32_t*>(pa + 8 * ld),
                           *reinterpret_cast<const uint32_t*>(pa + 8),
                           *reinterpret_cast<const uint32_t*>(pa + 8 * ld + 8)};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const T* pb = a_s + (32 * (j >> 2) + 8 * (g >> 1) + 2 * (j & 3) + (g & 1)) * lda_s + kk + 2 * t;
      cuda::mma16816<T>(acc[j], a, *reinterpret_cast<const uint32_t*>(pb), *reinterpret_cast<const uint32_t*>(pb + 8));
    }
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = r0 + 16 * warp + g + 8 * h;
    if (row >= rows) continue;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const float scale = scales.finish(parts[h][q], code);
      alignas(16) uint32_t v[4];
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {  // byte jj: columns 2 jj (high nibble) and 2 jj + 1 of the 8
        const uint32_t b = (words[h][q] >> (8 * jj)) & 0xffu;
        const float* a = acc[4 * q + jj];
        const float e0 = __fmaf_rn(s, a[2 * h], __fmul_rn(levels[b >> 4], scale));
        const float e1 = __fmaf_rn(s, a[2 * h + 1], __fmul_rn(levels[b & 15], scale));
        v[jj] = cuda::pack2<T>(e0, e1);
      }
      *reinterpret_cast<uint4*>(out + row * cols + c0 + 32 * q + 8 * t) = *reinterpret_cast<const uint4*>(v);
    }
  }
}

}  // namespace

at::Tensor nf4_dequantize_rect_lora_cuda(const Nf4Weight& w, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                                         const at::Tensor& lora_B, const at::Tensor& lora_A, double lora_scale) {
  const at::ScalarType dtype = lora_B.scalar_type();
  const int64_t k = w.in_features, rank = lora_A.size(0);
  const bool fits = (dtype == at::kBFloat16 || dtype == at::kHalf) && lora_A.scalar_type() == dtype &&
                    rank <= kMaxRank && k % 8 == 0 && col0 % 8 == 0 && cols % kCols == 0 && rows > 0 &&
                    rows <= int64_t{65535} * kRows && lora_B.size(0) == rows && lora_A.size(1) == cols &&
                    reinterpret_cast<uintptr_t>(w.packed.data_ptr()) % 4 == 0 &&
                    at::cuda::getCurrentDeviceProperties()->major >= 8 && cuda::log2_exact(w.blocksize) >= 0;
  if (!fits) return at::Tensor();
  // Inner strides of 1 (the slices of contiguous adapters are); anything else is copied, it is small.
  const at::Tensor b = lora_B.stride(1) == 1 ? lora_B : lora_B.contiguous();
  const at::Tensor a = lora_A.stride(1) == 1 ? lora_A : lora_A.contiguous();
  at::Tensor out = at::empty({rows, cols}, w.packed.options().dtype(dtype));
  const int rp = static_cast<int>((rank + 15) / 16 * 16);
  const size_t smem = (static_cast<size_t>(kRows) * (rp + 8) + static_cast<size_t>(kCols) * (rp + 2)) * 2;
  const dim3 grid(static_cast<unsigned int>(cols / kCols), static_cast<unsigned int>(cuda::ceil_div<int64_t>(rows, kRows)));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const cuda::BlockScales scales = cuda::make_block_scales(w);
  const int bs_shift = cuda::log2_exact(w.blocksize);
  const int64_t first = row0 * k + col0;
  const float s = static_cast<float>(lora_scale);
  const bool vec = rank % 8 == 0 && a.stride(0) % 8 == 0 && b.stride(0) % 8 == 0 &&
                   reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 == 0;
  const auto launch = [&](auto tag, auto vec_tag) {
    using T = decltype(tag);
    nf4_dequantize_rect_lora_kernel<T, decltype(vec_tag)::value><<<grid, kThreads, smem, stream>>>(
        w.packed.data_ptr<uint8_t>(), k, first, rows, cols, bs_shift, scales, b.data_ptr<T>(), b.stride(0),
        a.data_ptr<T>(), a.stride(0), static_cast<int>(rank), s, out.data_ptr<T>());
  };
  if (dtype == at::kBFloat16) {
    vec ? launch(at::BFloat16(), std::true_type()) : launch(at::BFloat16(), std::false_type());
  } else {
    vec ? launch(at::Half(), std::true_type()) : launch(at::Half(), std::false_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace lora_fused
