// lora_shrink on tensor cores (bf16/fp16, sm_80+): u[M, r] = scale * x[M, k] @ A[r, k]^T.
//
// The product has r <= 64 columns per tile, so it is bound by reading x once: a 128-thread block
// owns 64 rows of x (16 per warp) and RT ranks, and streams 128-column k-tiles of x and A through a
// 3-4 stage cp.async pipeline (rows of 256 bytes: long contiguous reads; 16-byte chunks XOR-swizzled
// by row so ldmatrix is conflict-free); each warp multiplies its 16 x 128 x-tile by the RT x 128
// A-tile with mma.m16n8k16.
// When the row blocks alone would leave SMs idle (M small against the GPU), k is split over
// blockIdx.y: each split writes fp32 partials and the last split to finish a tile (a counter per
// tile) adds them in split order, so the result does not depend on timing (deterministic).
// scale is applied to the fp32 sum, rounded once.
// Not on the LoRA layers' path: on an H100 it reached 36-78% of HBM bandwidth, 0.8-0.9x cuBLAS's
// speed at r = 16 and 0.4-0.7x at r = 64 for M >= 4096 (benchmarks/RESULTS.md, session 6), so the
// layers keep torch.mm for x A^T and dY B; it serves the lora_shrink op.
#include "cuda/lora_shrink_mma.h"

#include "cuda/common.cuh"
#include "cuda/mma_sm80.cuh"

namespace lora_fused {
namespace {

constexpr int kBM = 64;          // rows of x per block
constexpr int kBK = 128;         // k per pipeline stage: a 256-byte row of 16 chunks
constexpr int kRowBytes = kBK * 2;
constexpr int kThreads = 128;    // 4 warps x 16 rows
constexpr int kMinTilesPerSplit = 2;  // below this a split cannot fill its pipeline

struct ShrinkArgs {
  const void* x;
  int64_t ldx;
  const void* a;
  int64_t lda;
  void* u;
  float* partials;  // [splits][tiles][kBM * RT] when splits > 1
  int* arrivals;    // [tiles], zeroed, when splits > 1
  int64_t m, k, r;
  int k_tiles, tiles_per_split, splits;
  float scale;
};

template <int RT>
constexpr int stage_bytes() {
  return (kBM + RT) * kRowBytes;
}

// As many stages as keep two blocks (96 KiB each at most) on an SM.
template <int RT>
constexpr int stages() {
  return RT >= 64 ? 3 : 4;
}

// Byte offset of 16-byte chunk `chunk` of tile row `row`: the chunk's low 3 bits XOR row % 8, so the
// 8 rows an ldmatrix reads at one chunk fall on 8 different 16-byte bank groups.
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
}

template <typename T, int RT>
__global__ void __launch_bounds__(kThreads) lora_shrink_mma_kernel(const ShrinkArgs p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const T* x = static_cast<const T*>(p.x);
  const T* a = static_cast<const T*>(p.a);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t r0 = static_cast<int64_t>(blockIdx.z) * RT;
  const int kt0 = blockIdx.y * p.tiles_per_split;
  const int n_tiles = min(p.k_tiles, kt0 + p.tiles_per_split) - kt0;
  const uint32_t base = cuda::smem_u32(smem);
  constexpr int kStages = stages<RT>();

  auto load_tile = [&](int kt, int stage) {
    const uint32_t st = base + stage * stage_bytes<RT>();
    const int64_t k0 = static_cast<int64_t>(kt) * kBK;
#pragma unroll
    for (int c = tid; c < kBM * (kBK / 8); c += kThreads) {
      const int row = c / (kBK / 8), chunk = c % (kBK / 8);
      const int64_t m = m0 + row, kk = k0 + chunk * 8;
      const bool ok = m < p.m && kk < p.k;  // k % 8 == 0: a chunk is all in or all out
      cuda::cp_async_16(st + swizzled(row, chunk), ok ? x + m * p.ldx + kk : x, ok ? 16 : 0);
    }
#pragma unroll
    for (int c = tid; c < RT * (kBK / 8); c += kThreads) {
      const int row = c / (kBK / 8), chunk = c % (kBK / 8);
      const int64_t r = r0 + row, kk = k0 + chunk * 8;
      const bool ok = r < p.r && kk < p.k;
      cuda::cp_async_16(st + kBM * kRowBytes + swizzled(row, chunk), ok ? a + r * p.lda + kk : a, ok ? 16 : 0);
    }
  };

  float acc[RT / 8][4];
#pragma unroll
  for (int j = 0; j < RT / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) load_tile(kt0 + s, s);
    cuda::cp_async_commit();
  }
  // ldmatrix rows for this lane: x's 16 x 16 fragment (matrices: rows 0-7 / 8-15, k 0-7 / 8-15) and
  // A's 16 x 16 (matrices: ranks 0-7 k 0-7, ranks 0-7 k 8-15, ranks 8-15 k 0-7, ranks 8-15 k 8-15).
  const int x_row = warp * 16 + ((lane >> 3) & 1) * 8 + (lane & 7), x_half = lane >> 4;
  const int a_row = (lane >> 4) * 8 + (lane & 7), a_half = (lane >> 3) & 1;
  for (int i = 0; i < n_tiles; ++i) {
    cuda::cp_async_wait<kStages - 2>();
    __syncthreads();  // tile i landed for every thread; stage (i - 1) % kStages is free to refill
    if (i + kStages - 1 < n_tiles) load_tile(kt0 + i + kStages - 1, (i + kStages - 1) % kStages);
    cuda::cp_async_commit();
    const uint32_t st = base + (i % kStages) * stage_bytes<RT>();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t af[4];
      cuda::ldmatrix_x4(af, st + swizzled(x_row, 2 * kk + x_half));
#pragma unroll
      for (int nb = 0; nb < RT / 16; ++nb) {
        uint32_t bf[4];
        cuda::ldmatrix_x4(bf, st + kBM * kRowBytes + swizzled(nb * 16 + a_row, 2 * kk + a_half));
        cuda::mma16816<T>(acc[2 * nb], af, bf[0], bf[1]);
        cuda::mma16816<T>(acc[2 * nb + 1], af, bf[2], bf[3]);
      }
    }
  }
  cuda::cp_async_wait<0>();

  // Accumulator fragment: acc[j][2h + e] is row g + 8h, rank 8j + 2t + e (g = lane / 4, t = lane % 4).
  const int g = lane / 4, t = lane % 4;
  T* u = static_cast<T*>(p.u);
  if (p.splits == 1) {
#pragma unroll
    for (int j = 0; j < RT / 8; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t m = m0 + warp * 16 + g + 8 * h, r = r0 + 8 * j + 2 * t + e;
          if (m < p.m && r < p.r) u[m * p.r + r] = static_cast<T>(acc[j][2 * h + e] * p.scale);
        }
    return;
  }
  const int tile = blockIdx.z * gridDim.x + blockIdx.x, tiles = gridDim.x * gridDim.z;
  float* mine = p.partials + (static_cast<int64_t>(blockIdx.y) * tiles + tile) * (kBM * RT);
#pragma unroll
  for (int j = 0; j < RT / 8; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      *reinterpret_cast<float2*>(mine + (warp * 16 + g + 8 * h) * RT + 8 * j + 2 * t) =
          make_float2(acc[j][2 * h], acc[j][2 * h + 1]);
  __threadfence();  // partials visible device-wide before this split is counted
  __syncthreads();
  __shared__ bool last;
  if (tid == 0) last = atomicAdd(p.arrivals + tile, 1) == p.splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int idx = tid; idx < kBM * RT; idx += kThreads) {
    const int64_t m = m0 + idx / RT, r = r0 + idx % RT;
    if (m >= p.m || r >= p.r) continue;
    float s = 0.f;
    for (int sp = 0; sp < p.splits; ++sp) s += __ldcg(p.partials + (static_cast<int64_t>(sp) * tiles + tile) * (kBM * RT) + idx);
    u[m * p.r + r] = static_cast<T>(s * p.scale);
  }
}

template <typename T, int RT>
void launch(ShrinkArgs& p, int64_t row_blocks, int64_t rank_tiles, int sms, const at::TensorOptions& opts,
            cudaStream_t stream) {
  constexpr size_t smem = static_cast<size_t>(stages<RT>()) * stage_bytes<RT>();
  cuda::opt_in_dynamic_smem<lora_shrink_mma_kernel<T, RT>>(smem);
  const int64_t tiles = row_blocks * rank_tiles;
  // Two blocks per SM at least: split k when the tiles alone give fewer.
  int splits = 1;
  if (tiles < 2LL * sms) {
    const int64_t want = cuda::ceil_div<int64_t>(2LL * sms, tiles);
    splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, p.k_tiles / kMinTilesPerSplit)));
  }
  p.tiles_per_split = static_cast<int>(cuda::ceil_div<int64_t>(p.k_tiles, splits));
  p.splits = static_cast<int>(cuda::ceil_div<int64_t>(p.k_tiles, p.tiles_per_split));
  at::Tensor partials, arrivals;
  if (p.splits > 1) {
    partials = at::empty({p.splits * tiles * kBM * RT}, opts.dtype(at::kFloat));
    arrivals = at::zeros({tiles}, opts.dtype(at::kInt));
    p.partials = partials.data_ptr<float>();
    p.arrivals = arrivals.data_ptr<int>();
  }
  const dim3 grid(cuda::grid_x(row_blocks, "lora_fused.lora_shrink"), static_cast<unsigned int>(p.splits),
                  static_cast<unsigned int>(rank_tiles));
  lora_shrink_mma_kernel<T, RT><<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_for_rank(ShrinkArgs& p, int sms, const at::TensorOptions& opts, cudaStream_t stream) {
  const int64_t row_blocks = cuda::ceil_div<int64_t>(p.m, kBM);
  if (p.r <= 16) {
    launch<T, 16>(p, row_blocks, 1, sms, opts, stream);
  } else if (p.r <= 32) {
    launch<T, 32>(p, row_blocks, 1, sms, opts, stream);
  } else {
    launch<T, 64>(p, row_blocks, cuda::ceil_div<int64_t>(p.r, 64), sms, opts, stream);
  }
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(1) == 1 && t.stride(0) % 8 == 0;
}

}  // namespace

bool lora_shrink_mma(const at::Tensor& x_in, const at::Tensor& a_in, double scale, at::Tensor& u) {
  const at::ScalarType t = x_in.scalar_type();
  if (t != at::kBFloat16 && t != at::kHalf) return false;
  const int64_t M = x_in.size(0), K = x_in.size(1), R = a_in.size(0);
  if (M < 1 || K < 1 || K % 8 != 0) return false;
  const auto props = at::cuda::getCurrentDeviceProperties();
  if (props->major < 8) return false;
  const at::Tensor x = aligned16(x_in) ? x_in : x_in.clone(at::MemoryFormat::Contiguous);
  const at::Tensor lora_a = aligned16(a_in) ? a_in : a_in.clone(at::MemoryFormat::Contiguous);
  ShrinkArgs p{};
  p.x = x.data_ptr();
  p.ldx = x.stride(0);
  p.a = lora_a.data_ptr();
  p.lda = lora_a.stride(0);
  p.u = u.data_ptr();
  p.m = M;
  p.k = K;
  p.r = R;
  p.k_tiles = static_cast<int>(cuda::ceil_div<int64_t>(K, kBK));
  p.scale = static_cast<float>(scale);
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (t == at::kBFloat16) {
    launch_for_rank<at::BFloat16>(p, props->multiProcessorCount, x.options(), stream);
  } else {
    launch_for_rank<at::Half>(p, props->multiProcessorCount, x.options(), stream);
  }
  return true;
}

}  // namespace lora_fused
