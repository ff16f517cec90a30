// dU = s dY B [M, r] and dB = dY^T u [N, r] (u = s x A^T, given) from one read of dY [M, N]: the two
// products of the LoRA backward that stream grad_out. As two cuBLAS GEMMs each reads all of dY (at
// 4096 x 11008 bf16, 90 MB: 39 + 36 us on an H100, benchmarks/RESULTS.md session 17).
// Tiling: a 256-thread block owns a panel of 256 rows of dY and a range of its columns, streamed in
// 64-column chunks through a two-stage cp.async pipeline with the chunk's 64 rows of B beside them;
// the panel's u [256, r] is staged once. Per chunk, warp w adds rows 32w..32w+31 of the chunk times
// B's rows to its dU accumulators, and makes a 16 x 8 block of the chunk's dB = chunk^T u (16
// chunk columns by 8 ranks, over the panel's 256 rows), the chunk read transposed by ldmatrix.trans.
// mma.sync m16n8k16, fp32 accumulators; r zero-padded to kR (16, 32, 64). dB per row panel and dU
// per column range are fp32 partials that a second kernel sums in a fixed order and rounds once:
// deterministic, no atomics. Measured on an H100 (session 17): 47 + 6 us at 4096 x 11008, r = 16,
// 1.13-1.20x faster than the two GEMMs at r = 16, but slower at r = 64 (one block per SM, bound by
// its shared-memory reads) and at 256 rows (a single row panel: many column splits and partials).
#include <cstdlib>
#include <cstring>

#include "cuda/common.cuh"
#include "cuda/lora_dy_grads.h"
#include "cuda/mma_sm80.cuh"

namespace lora_fused {
namespace cuda {
namespace {

constexpr int kPanel = 256;  // rows of dY per block
constexpr int kChunk = 64;   // columns of dY per pipeline stage
constexpr int kThreads = 256;  // 8 warps
constexpr int kTileLd = kChunk + 8;  // row stride (elements) of a staged chunk: 144 bytes, ldmatrix conflict-free

struct DyGradsArgs {
  const void* dy;
  const void* b;
  const void* u;
  float* part_u;  // [splits][M][kR]
  float* part_b;  // [panels][N][kR]
  int64_t m, n;
  int r, chunks_per_split;
};

template <int kR>
constexpr int rank_ld() {  // row stride (elements) of staged B and u rows: 48, 80 or 144 bytes, conflict-free
  return kR + 8;
}

template <int kR>
constexpr size_t smem_bytes() {
  return 2 * (static_cast<size_t>(kPanel) * kTileLd + kChunk * rank_ld<kR>()) * 2 +
         static_cast<size_t>(kPanel) * rank_ld<kR>() * 2;
}

template <typename T, int kR>
__global__ void __launch_bounds__(kThreads) lora_dy_grads_kernel(const DyGradsArgs p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int ldr = rank_ld<kR>();
  T* tiles = reinterpret_cast<T*>(smem_raw);           // [2][kPanel][kTileLd]
  T* bs = tiles + 2 * kPanel * kTileLd;                // [2][kChunk][ldr]
  T* us = bs + 2 * kChunk * ldr;                       // [kPanel][ldr]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kPanel;
  const int64_t first_chunk = static_cast<int64_t>(blockIdx.x) * p.chunks_per_split;
  const int64_t total_chunks = (p.n + kChunk - 1) / kChunk;
  const int chunks = static_cast<int>(std::min<int64_t>(p.chunks_per_split, total_chunks - first_chunk));
  const T* dy = static_cast<const T*>(p.dy);
  const T* bg = static_cast<const T*>(p.b);
  const T* ug = static_cast<const T*>(p.u);
  const int half_r = p.r / 2;  // r is even: rows of B and u load as 4-byte pairs

  // Rows (of B or u) [row0, row0 + rows) of a [total, r] matrix into smem rows of ldr, zero beyond
  // `total` and beyond r.
  const auto stage_rank_rows = [&](T* dst, const T* src, int64_t row0, int rows, int64_t total) {
    for (int i = tid; i < rows * (kR / 2); i += kThreads) {
      const int row = i / (kR / 2), w = i - row * (kR / 2);
      const bool in = row0 + row < total && w < half_r;
      const T* from = in ? src + (row0 + row) * p.r + 2 * w : src;
      cp_async_4(smem_u32(dst + row * ldr + 2 * w), from, in ? 4 : 0);
    }
  };
  const auto stage_chunk = [&](int s, int64_t c) {
    const int64_t n0 = c * kChunk;
    T* tile = tiles + s * kPanel * kTileLd;
    for (int i = tid; i < kPanel * (kChunk / 8); i += kThreads) {
      const int row = i / (kChunk / 8), ch = i - row * (kChunk / 8);
      const int64_t gm = m0 + row, gn = n0 + 8 * ch;
      const bool in = gm < p.m && gn < p.n;  // n % 8 == 0: a 16-byte chunk is all in or all out
      cp_async_16(smem_u32(tile + row * kTileLd + 8 * ch), in ? dy + gm * p.n + gn : dy, in ? 16 : 0);
    }
    stage_rank_rows(bs + s * kChunk * ldr, bg, n0, kChunk, p.n);
  };

  float acc_u[2][kR / 8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < kR / 8; ++nt) acc_u[mt][nt][0] = acc_u[mt][nt][1] = acc_u[mt][nt][2] = acc_u[mt][nt][3] = 0.f;

  stage_rank_rows(us, ug, m0, kPanel, p.m);
  stage_chunk(0, first_chunk);
  cp_async_commit();
  // dB: this warp's 16 chunk columns (mt_b) and n-tiles nt_b + 2 i of the ranks.
  const int mt_b = warp % 4, nt_b = warp / 4;
  constexpr int kNtB = kR / 16;
  for (int c = 0; c < chunks; ++c) {
    if (c + 1 < chunks) {
      stage_chunk((c + 1) & 1, first_chunk + c + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* tile = tiles + (c & 1) * kPanel * kTileLd;
    const T* bc = bs + (c & 1) * kChunk * ldr;

    // dU rows 32 warp .. + 31 += tile rows x B chunk rows (k = the chunk's 64 columns).
#pragma unroll
    for (int ks = 0; ks < kChunk / 16; ++ks) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int row = 32 * warp + 16 * mt + (lane % 8) + 8 * ((lane / 8) & 1);
        ldmatrix_x4(a[mt], smem_u32(tile + row * kTileLd + 16 * ks + 8 * (lane / 16)));
      }
#pragma unroll
      for (int np = 0; np < kR / 16; ++np) {
        uint32_t b[4];  // b[0], b[1]: n-tile 2 np; b[2], b[3]: n-tile 2 np + 1
        ldmatrix_x4_trans(b, smem_u32(bc + (16 * ks + (lane % 8) + 8 * ((lane / 8) & 1)) * ldr + 16 * np + 8 * (lane / 16)));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma16816<T>(acc_u[mt][2 * np], a[mt], b[0], b[1]);
          mma16816<T>(acc_u[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }

    // dB chunk columns 16 mt_b .. + 15 x ranks of n-tiles nt_b + 2 i = tile^T (k = the panel's rows) x u.
    float acc_b[kNtB][4];
#pragma unroll
    for (int i = 0; i < kNtB; ++i) acc_b[i][0] = acc_b[i][1] = acc_b[i][2] = acc_b[i][3] = 0.f;
#pragma unroll 2
    for (int ks = 0; ks < kPanel / 16; ks += 2) {
      uint32_t a[2][4];  // k-steps ks and ks + 1: matrix i at panel rows + 8 (i / 2), columns + 8 (i % 2)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int krow = 16 * (ks + h) + (lane % 8) + 8 * (lane / 16);
        ldmatrix_x4_trans(a[h], smem_u32(tile + krow * kTileLd + 16 * mt_b + 8 * ((lane / 8) & 1)));
      }
#pragma unroll
      for (int i = 0; i < kNtB; ++i) {
        uint32_t b[4];  // b[0], b[1]: k-step ks; b[2], b[3]: k-step ks + 1
        ldmatrix_x4_trans(b, smem_u32(us + (16 * ks + lane) * ldr + 8 * (nt_b + 2 * i)));
        mma16816<T>(acc_b[i], a[0], b[0], b[1]);
        mma16816<T>(acc_b[i], a[1], b[2], b[3]);
      }
    }
    const int64_t n_row = (first_chunk + c) * kChunk + 16 * mt_b + g;
    float* pb = p.part_b + static_cast<int64_t>(blockIdx.y) * p.n * kR;
#pragma unroll
    for (int i = 0; i < kNtB; ++i) {
      const int col = 8 * (nt_b + 2 * i) + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t n = n_row + 8 * h;
        if (n < p.n) *reinterpret_cast<float2*>(pb + n * kR + col) = make_float2(acc_b[i][2 * h], acc_b[i][2 * h + 1]);
      }
    }
    __syncthreads();  // the next iteration's loads overwrite this stage
  }

  float* pu = p.part_u + static_cast<int64_t>(blockIdx.x) * p.m * kR;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + 32 * warp + 16 * mt + g + 8 * h;
      if (m >= p.m) continue;
#pragma unroll
      for (int nt = 0; nt < kR / 8; ++nt)
        *reinterpret_cast<float2*>(pu + m * kR + 8 * nt + 2 * t) = make_float2(acc_u[mt][nt][2 * h], acc_u[mt][nt][2 * h + 1]);
    }
  }
}

// du[m, j] = scale * sum over splits of part_u; dB[n, j] = sum over panels of part_b; in that order.
template <typename T>
__global__ void lora_dy_grads_sum_kernel(const float* __restrict__ part_u, const float* __restrict__ part_b,
                                         T* __restrict__ du, T* __restrict__ db, int64_t m, int64_t n, int r, int kr,
                                         int splits, int panels, float scale) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < m * r) {
    const int64_t row = i / r, j = i - row * r;
    float s = 0.f;
    for (int q = 0; q < splits; ++q) s += part_u[(q * m + row) * kr + j];
    du[i] = static_cast<T>(scale * s);
  } else if (i < (m + n) * r) {
    const int64_t k = i - m * r, row = k / r, j = k - row * r;
    float s = 0.f;
    for (int q = 0; q < panels; ++q) s += part_b[(q * n + row) * kr + j];
    db[k] = static_cast<T>(s);
  }
}

// Rows from which the kernel runs by default (and r <= 32): below them, and at r = 64, the two GEMMs
// were faster on an H100 (256 rows: 29.8 against 27.2 us; r = 64: 83.2 against 75.0; session 17).
constexpr int64_t kAutoMinRows = 2048;
constexpr int64_t kAutoMaxRank = 32;

// LORA_FUSED_LORA_GRADS: unset, the kernel where it is faster (kAutoMinRows, kAutoMaxRank); "fused",
// wherever it applies; "gemm", never.
bool requested(int64_t m, int64_t r) {
  const char* env = std::getenv("LORA_FUSED_LORA_GRADS");
  if (env == nullptr || *env == '\0') return m >= kAutoMinRows && r <= kAutoMaxRank;
  if (std::strcmp(env, "fused") == 0) return true;
  TORCH_CHECK(std::strcmp(env, "gemm") == 0, "LORA_FUSED_LORA_GRADS must be unset, fused or gemm; got '", env, "'");
  return false;
}

}  // namespace

bool lora_dy_grads(const at::Tensor& dy, const at::Tensor& lora_B, const at::Tensor& u, double scale, at::Tensor& du,
                   at::Tensor& dB) {
  const at::ScalarType t = dy.scalar_type();
  const int64_t m = dy.size(0), n = dy.size(1), r = lora_B.size(1);
  const auto aligned = [](const at::Tensor& x, uintptr_t bytes) {
    return reinterpret_cast<uintptr_t>(x.data_ptr()) % bytes == 0;
  };
  if (!dy.is_cuda() || !requested(m, r) || (t != at::kBFloat16 && t != at::kHalf) || lora_B.scalar_type() != t ||
      u.scalar_type() != t || m < 1 || n < 1 || n % 8 != 0 || r < 2 || r > 64 || r % 2 != 0 || !dy.is_contiguous() ||
      !lora_B.is_contiguous() || !u.is_contiguous() || !aligned(dy, 16) || !aligned(lora_B, 4) || !aligned(u, 4) ||
      at::cuda::getCurrentDeviceProperties()->major < 8)
    return false;
  const int64_t panels = ceil_div<int64_t>(m, kPanel), total_chunks = ceil_div<int64_t>(n, kChunk);
  if (panels > 65535) return false;
  const c10::cuda::CUDAGuard guard(dy.device());
  const int kr = r <= 16 ? 16 : r <= 32 ? 32 : 64;
  // About two blocks per SM (one at kR = 64: 126 KiB of shared memory), whole row panels first.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = static_cast<int64_t>(kr == 64 ? 1 : 2) * sms;
  const int64_t splits0 = std::min<int64_t>(std::max<int64_t>(ceil_div<int64_t>(want, panels), 1), total_chunks);
  const int64_t per_split = ceil_div<int64_t>(total_chunks, splits0);
  const int64_t splits = ceil_div<int64_t>(total_chunks, per_split);
  const at::TensorOptions f32 = dy.options().dtype(at::kFloat);
  const at::Tensor part_u = at::empty({splits, m, kr}, f32), part_b = at::empty({panels, n, kr}, f32);
  du = at::empty({m, r}, dy.options());
  dB = at::empty({n, r}, dy.options());
  const DyGradsArgs args{dy.data_ptr(), lora_B.data_ptr(), u.data_ptr(), part_u.data_ptr<float>(),
                         part_b.data_ptr<float>(), m, n, static_cast<int>(r), static_cast<int>(per_split)};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned int>(splits), static_cast<unsigned int>(panels));
  const auto launch = [&](auto tag, auto kr_tag) {
    using T = decltype(tag);
    constexpr int kR = decltype(kr_tag)::value;
    constexpr size_t smem = smem_bytes<kR>();
    opt_in_dynamic_smem<lora_dy_grads_kernel<T, kR>>(smem);
    lora_dy_grads_kernel<T, kR><<<grid, kThreads, smem, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t outputs = (m + n) * r;
    lora_dy_grads_sum_kernel<T><<<grid_x(ceil_div<int64_t>(outputs, 256), "lora_fused.lora_adapter_grads"), 256, 0,
                                  stream>>>(part_u.data_ptr<float>(), part_b.data_ptr<float>(), du.data_ptr<T>(),
                                            dB.data_ptr<T>(), m, n, static_cast<int>(r), kr, static_cast<int>(splits),
                                            static_cast<int>(panels), static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const auto by_rank = [&](auto tag) {
    if (kr == 16) launch(tag, std::integral_constant<int, 16>());
    else if (kr == 32) launch(tag, std::integral_constant<int, 32>());
    else launch(tag, std::integral_constant<int, 64>());
  };
  if (t == at::kBFloat16) by_rank(at::BFloat16());
  else by_rank(at::Half());
  return true;
}

}  // namespace cuda
}  // namespace lora_fused
