// lora_decode's Hopper kernel: out[M, d] = x @ W^T + scale * u @ B^T + bias for M = 1..16 tokens,
// bound by streaming W once. The two kernels of lora_decode.cu / lora_decode_mma.cu load W with
// plain 16-byte loads, a few per lane in flight and none while they multiply; their stream ran 8-12%
// behind cuBLAS's at 8192->8192 and 11008->4096 (H100). Here one warp of each block issues bulk
// copies (TMA, one per row and stage: 512 columns, 1 KiB) of the tile's weight rows and of x's M rows
// into a ring of shared-memory stages, so the next stages' copies are in flight while four warps
// multiply, and the ring runs on across the row tiles of a persistent block (no drain between
// tiles). x comes with each stage: loaded from global memory (L1/L2) by the multiplying warps, its
// latency was paid once a stage (8192->8192 at 16 tokens: 71 us against cuBLAS's 46).
// Tiling: a tile is 16 (or 32) weight rows x all of K; a stage is those rows x 512 columns; each
// multiplying warp takes 128 columns of a stage as 4 steps of m16n8k16 with swapped operands (16
// weight rows are the mma's rows, the tokens its 8 or 16 columns), each lane's A fragment 16 bytes
// of two weight rows and its B fragment 16 bytes of one x row, the k order permuted alike inside a
// k16 step as in lora_decode_mma.cu. Rows are padded to 1088 bytes, 64 bytes apart mod 128, so the 8
// lanes of each quarter-warp of a 16-byte shared load (2 rows x 64 bytes) hit distinct banks. The 4
// warps' fp32 partials meet in shared memory (two buffers, by tile parity, so one named barrier a
// tile suffices), where the LoRA term (u from the shrink kernel's partial sums, waited for only at
// the first tile's end; the tile's lora_B rows staged by the copying warp) and the bias join before
// a single rounding.
#include "cuda/lora_decode_bulk.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/bulk_copy_sm90.cuh"
#include "cuda/common.cuh"
#include "cuda/lora_shrink_partials.h"
#include "cuda/mma_sm80.cuh"
#include "cuda/pdl.cuh"

namespace lora_fused {
namespace cuda {
namespace {

constexpr int kConsumers = 4;                   // warps that multiply; one more issues the copies
constexpr int kThreads = (kConsumers + 1) * 32;
constexpr int kCols = 512;                      // weight columns a stage
constexpr int kRowBytes = kCols * 2 + 64;       // a padded row of a stage (bank-conflict free reads)
constexpr int kWarpCols = kCols / kConsumers;   // 128 columns: 4 steps of 32 a warp and stage
constexpr int kSteps = kWarpCols / 32;
constexpr int kMaxStages = 8;
// full[kMaxStages], empty[kMaxStages], then the LoRA rows' bfull[2], bempty[2]; 256 keeps the ring 128-byte aligned.
constexpr int kBarBytes = 256;
static_assert((2 * kMaxStages + 4) * 8 <= kBarBytes, "the mbarriers overflow their bytes");
constexpr int kRedLd = 17;                      // tokens of a row's partials (16) + 1
constexpr int kMaxRank = 256;
constexpr int kMaxDefaultStages = 4;  // 6 were no faster than 4 at 8192->8192 (H100)

__host__ __device__ constexpr int stage_bytes(int rows) { return rows * kRowBytes; }

// A staged lora_B row's length in 16-bit elements: 2 mod 4, so rows are an odd number of 4-byte
// words apart and the epilogue's threads (one row each, same j) read distinct banks.
__host__ __device__ constexpr int b_stride(int r) { return (r + 3) / 4 * 4 + 2; }

// A stage holds `rows` weight rows and the M tokens' rows of x, as copied.
size_t smem_fixed_bytes(int rows, int m, int r) {
  return kBarBytes + static_cast<size_t>(2 * kConsumers * rows * kRedLd) * 4 + static_cast<size_t>(m) * r * 4 +
         static_cast<size_t>(2 * rows) * b_stride(r) * 2 + static_cast<size_t>(2 * rows) * 4;
}
size_t smem_bytes(int rows, int stages, int m, int r) {
  return smem_fixed_bytes(rows, m, r) + static_cast<size_t>(stages) * stage_bytes(rows + m);
}

// The copying warp stages tile `tile`'s lora_B rows [kRows][R] (rows past D repeat row D - 1) into
// bt (row stride ldb) and its bias (fp32, 0 without) into bias_t, once the multiplying warps have
// released the buffer (bempty, parity ph ^ 1); each lane's arrival on bfull releases its stores.
// Loads in batches of 8 a lane, all in flight before their stores.
template <typename T, int kRows>
__device__ __forceinline__ void stage_lora_rows(const LoraDecodeArgs& a, T* bt, int ldb, float* bias_t, int64_t tile,
                                                uint32_t bfull, uint32_t bempty, uint32_t ph, int lane) {
  tx_mbarrier_wait(bempty, ph ^ 1);
  const T* b = static_cast<const T*>(a.b);
  const int n = kRows * a.R;
  for (int e0 = 0; e0 < n; e0 += 8 * 32) {
    T v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int e = e0 + i * 32 + lane, r = e / a.R, j = e % a.R;
      const int64_t f = tile * kRows + r < a.D ? tile * kRows + r : a.D - 1;
      v[i] = e < n ? b[f * a.b_sd + j * a.b_sr] : T(0.0f);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int e = e0 + i * 32 + lane;
      if (e < n) bt[(e / a.R) * ldb + e % a.R] = v[i];
    }
  }
  if (lane < kRows) {
    const int64_t f = tile * kRows + lane < a.D ? tile * kRows + lane : a.D - 1;
    bias_t[lane] = a.bias != nullptr ? static_cast<float>(static_cast<const T*>(a.bias)[f]) : 0.0f;
  }
  tx_mbarrier_arrive(bfull);
}

// RG 16-row groups a tile; NT 8-token column blocks of the mma (M <= 8 * NT).
template <typename T, int NT, int RG>
__global__ void __launch_bounds__(kThreads, 2) lora_decode_bulk_kernel(const LoraDecodeArgs a, int stages) {
  constexpr int kRows = 16 * RG;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t full0 = smem_u32(smem), empty0 = full0 + kMaxStages * 8, ring = full0 + kBarBytes;
  const int sbytes = stage_bytes(kRows + a.M);  // kRows weight rows, then M rows of x
  float* red = reinterpret_cast<float*>(smem + kBarBytes + stages * sbytes);  // [2][kConsumers][kRows][kRedLd]
  float* us = red + 2 * kConsumers * kRows * kRedLd;                                       // [M][R], scaled
  // The tile's lora_B rows and bias, staged by the copying warp: [2][kRows][b_stride(R)], [2][kRows].
  T* bs = reinterpret_cast<T*>(us + a.M * a.R);
  float* bias_s = reinterpret_cast<float*>(bs + 2 * kRows * b_stride(a.R));
  const int ldb = b_stride(a.R);
  const uint32_t bfull0 = full0 + 2 * kMaxStages * 8, bempty0 = bfull0 + 16;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      tx_mbarrier_init(full0 + 8 * s, 1);
      tx_mbarrier_init(empty0 + 8 * s, kConsumers);
    }
    for (int i = 0; i < 2; ++i) {
      tx_mbarrier_init(bfull0 + 8 * i, 32);
      tx_mbarrier_init(bempty0 + 8 * i, kConsumers);
    }
    tx_mbarrier_init_fence();
  }
  __syncthreads();
  // This block's tiles: a contiguous run (consecutive rows of W), the runs' lengths differing by <= 1.
  const int64_t ntiles = ceil_div<int64_t>(a.D, kRows);
  const int64_t t_begin = ntiles * blockIdx.x / gridDim.x, t_end = ntiles * (blockIdx.x + 1) / gridDim.x;
  const int64_t ksteps = ceil_div<int64_t>(a.K, kCols);

  if (warp == kConsumers) {
    // The copies: row i of a stage by lane i % 32: weight row i of the tile (rows past D repeat row
    // D - 1; never stored), then x's rows.
    int s = 0;
    uint32_t ph = 0;
    for (int64_t tile = t_begin; tile < t_end; ++tile) {
      const int tb = static_cast<int>((tile - t_begin) & 1);
      const uint32_t tph = static_cast<uint32_t>(((tile - t_begin) >> 1) & 1);
      const int64_t row = tile * kRows + lane < a.D ? tile * kRows + lane : a.D - 1;
      const T* src = static_cast<const T*>(a.w) + row * a.ldw;
      const int xm = kRows == 32 ? lane : lane - kRows;  // x's row this lane copies, if 0 <= xm < M
      const T* xsrc = static_cast<const T*>(a.x) + (xm > 0 ? xm : 0) * a.ldx;
      for (int64_t ks = 0; ks < ksteps; ++ks) {
        const int64_t k0 = ks * kCols;
        const uint32_t bytes = static_cast<uint32_t>((a.K - k0 < kCols ? a.K - k0 : kCols) * sizeof(T));
        tx_mbarrier_wait(empty0 + 8 * s, ph ^ 1);  // the multiplying warps are done with this stage
        if (lane == 0) tx_mbarrier_arrive_expect(full0 + 8 * s, bytes * (kRows + a.M));
        __syncwarp();
        const uint32_t dst = ring + s * sbytes, bar = full0 + 8 * s;
        if (lane < kRows) bulk_copy_g2s(dst + lane * kRowBytes, src + k0, bytes, bar);
        if (xm >= 0 && xm < a.M) bulk_copy_g2s(dst + (kRows + xm) * kRowBytes, xsrc + k0, bytes, bar);
        if (++s == stages) s = 0, ph ^= 1;
        // The tile's lora_B rows and bias into shared memory once all its copies are issued (the
        // ring's stages then cover the loads' latency; earlier they would delay the weight stream),
        // so that the epilogue reads no global memory.
        if (ks == ksteps - 1) stage_lora_rows<T, kRows>(a, bs + tb * kRows * ldb, ldb,
                                                                                      bias_s + tb * kRows, tile, bfull0 + 8 * tb,
                                                                                      bempty0 + 8 * tb, tph, lane);
      }
    }
    return;  // the multiplying warps wait for every copy before they finish
  }

  const int g = lane / 4, t = lane % 4;
  bool xin[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) xin[n] = g + 8 * n < a.M;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  T* out = static_cast<T*>(a.out);
  int s = 0, buf = 0;
  uint32_t ph = 0;
  bool have_u = false;
  for (int64_t tile = t_begin; tile < t_end; ++tile) {
    float c[RG][NT][4];
#pragma unroll
    for (int rg = 0; rg < RG; ++rg)
#pragma unroll
      for (int n = 0; n < NT; ++n) c[rg][n][0] = c[rg][n][1] = c[rg][n][2] = c[rg][n][3] = 0.0f;
    for (int64_t ks = 0; ks < ksteps; ++ks) {
      const int64_t k0 = ks * kCols;
      const int kc = static_cast<int>(a.K - k0 < kCols ? a.K - k0 : kCols);  // a multiple of 8
      tx_mbarrier_wait(full0 + 8 * s, ph);
      const unsigned char* st = smem + kBarBytes + s * sbytes;
#pragma unroll
      for (int i = 0; i < kSteps; ++i) {
        const int col = warp * kWarpCols + i * 32 + 8 * t;
        const bool ok = col < kc;  // past K (and x's rows past M) the stage holds stale bytes
        uint4 vx[NT];
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          vx[n] = ok && xin[n] ? *reinterpret_cast<const uint4*>(st + (kRows + g + 8 * n) * kRowBytes + col * 2) : zero;
        }
#pragma unroll
        for (int rg = 0; rg < RG; ++rg) {
          uint4 va = *reinterpret_cast<const uint4*>(st + (rg * 16 + g) * kRowBytes + col * 2);
          uint4 vb = *reinterpret_cast<const uint4*>(st + (rg * 16 + g + 8) * kRowBytes + col * 2);
          if (!ok) va = vb = zero;
          const uint32_t a0[4] = {va.x, vb.x, va.y, vb.y};  // k 8t..8t+3
          const uint32_t a1[4] = {va.z, vb.z, va.w, vb.w};  // k 8t+4..8t+7
#pragma unroll
          for (int n = 0; n < NT; ++n) {
            mma16816<T>(c[rg][n], a0, vx[n].x, vx[n].y);
            mma16816<T>(c[rg][n], a1, vx[n].z, vx[n].w);
          }
        }
      }
      __syncwarp();
      if (lane == 0) tx_mbarrier_arrive(empty0 + 8 * s);
      if (++s == stages) s = 0, ph ^= 1;
    }
    // c[rg][n]: rows rg * 16 + g and + 8 of the tile, tokens 2t, 2t + 1 (+ 8n).
    float* rb = red + buf * kConsumers * kRows * kRedLd;
#pragma unroll
    for (int rg = 0; rg < RG; ++rg)
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int m = 2 * t + 8 * n, r = rg * 16 + g;
        rb[(warp * kRows + r) * kRedLd + m] = c[rg][n][0];
        rb[(warp * kRows + r) * kRedLd + m + 1] = c[rg][n][1];
        rb[(warp * kRows + r + 8) * kRedLd + m] = c[rg][n][2];
        rb[(warp * kRows + r + 8) * kRedLd + m + 1] = c[rg][n][3];
      }
    const int tb = static_cast<int>((tile - t_begin) & 1);
    tx_mbarrier_wait(bfull0 + 8 * tb, static_cast<uint32_t>(((tile - t_begin) >> 1) & 1));  // lora_B rows, bias
    const T* bt = bs + tb * kRows * ldb;
    if (!have_u) {
      // u only now: the shrink kernel (programmatic dependent launch) ran beside the first tile.
      if (a.u == nullptr) pdl_wait();
      for (int i = threadIdx.x; i < a.M * a.R; i += kConsumers * 32) {
        const int m = i / a.R, j = i % a.R;
        const float v = a.u != nullptr ? static_cast<float>(static_cast<const T*>(a.u)[m * a.ldu + j])
                                       : lora_shrink_sum(a.parts, a.splits, a.M, a.R, m, j);
        us[i] = v * a.scale;
      }
      have_u = true;
    }
    named_barrier_sync(1, kConsumers * 32);
    for (int i = threadIdx.x; i < kRows * a.M; i += kConsumers * 32) {
      const int r = i % kRows, m = i / kRows;  // consecutive threads: consecutive features
      const int64_t f = tile * kRows + r;
      if (f >= a.D) continue;
      float v = 0.0f;
#pragma unroll
      for (int w = 0; w < kConsumers; ++w) v += rb[(w * kRows + r) * kRedLd + m];
      const T* brow = bt + r * ldb;
#pragma unroll 4
      for (int j = 0; j < a.R; ++j) v = fmaf(us[m * a.R + j], static_cast<float>(brow[j]), v);
      if (a.bias != nullptr) v += bias_s[tb * kRows + r];
      out[m * a.D + f] = static_cast<T>(v);
    }
    __syncwarp();
    if (lane == 0) tx_mbarrier_arrive(bempty0 + 8 * tb);
    buf ^= 1;
  }
}

int env_choice(const char* name, int fallback, std::initializer_list<int> allowed) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  std::string list;
  for (int v : allowed) {
    if (std::to_string(v) == env) return v;
    list += (list.empty() ? "" : ", ") + std::to_string(v);
  }
  TORCH_CHECK(false, "lora_fused.lora_decode: ", name, " must be one of ", list, "; got '", env, "'");
}

template <typename T, int NT, int RG>
void launch(const LoraDecodeArgs& a, int stages, bool pdl, cudaStream_t stream) {
  constexpr int kRows = 16 * RG;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (stages == 0) {
    // By default as many stages (2 to 4) as let two blocks share an SM: 4 up to 8 tokens, 3 at 16 (16-row tiles).
    const int64_t per_block = static_cast<int64_t>(prop->sharedMemPerMultiprocessor / 2) - prop->reservedSharedMemPerBlock -
                              static_cast<int64_t>(smem_fixed_bytes(kRows, a.M, a.R));
    const int64_t fit = per_block / stage_bytes(kRows + a.M);
    stages = static_cast<int>(fit < 2 ? 2 : fit > kMaxDefaultStages ? kMaxDefaultStages : fit);
  }
  const size_t smem = smem_bytes(kRows, stages, a.M, a.R);
  TORCH_CHECK(smem <= prop->sharedMemPerBlockOptin, "lora_fused.lora_decode: LORA_FUSED_DECODE_STAGES=", stages,
              " with ", kRows, "-row tiles needs ", smem, " bytes of shared memory a block; this GPU has ",
              prop->sharedMemPerBlockOptin);
  opt_in_dynamic_smem<lora_decode_bulk_kernel<T, NT, RG>>(prop->sharedMemPerBlockOptin);
  int per_sm = static_cast<int>(prop->sharedMemPerMultiprocessor / (smem + prop->reservedSharedMemPerBlock));
  per_sm = per_sm < 1 ? 1 : per_sm > 2 ? 2 : per_sm;  // 2: __launch_bounds__'s registers
  const int64_t tiles = ceil_div<int64_t>(a.D, kRows);
  const int64_t blocks = std::min<int64_t>(tiles, static_cast<int64_t>(per_sm) * prop->multiProcessorCount);
  launch_maybe_pdl(pdl, lora_decode_bulk_kernel<T, NT, RG>, dim3(grid_x(blocks, "lora_fused.lora_decode")),
                   dim3(kThreads), smem, stream, a, stages);
}

template <typename T>
void launch_rows(const LoraDecodeArgs& a, int rows, int stages, bool pdl, cudaStream_t stream) {
  if (a.M <= 8) {
    rows == 16 ? launch<T, 1, 1>(a, stages, pdl, stream) : launch<T, 1, 2>(a, stages, pdl, stream);
  } else {
    rows == 16 ? launch<T, 2, 1>(a, stages, pdl, stream) : launch<T, 2, 2>(a, stages, pdl, stream);
  }
}

}  // namespace

bool lora_decode_bulk_available() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major != 9 || prop->minor != 0) return false;
  // The binary loaded for this GPU must hold sm_90 code (not a JIT-compiled older target, which traps).
  static const bool has_sm90_code = [] {
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, lora_decode_bulk_kernel<at::BFloat16, 1, 1>) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    return attr.binaryVersion >= 90;
  }();
  return has_sm90_code;
}

void lora_decode_bulk_launch(const LoraDecodeArgs& a, at::ScalarType dtype, bool pdl, cudaStream_t stream) {
  TORCH_CHECK(a.M >= 1 && a.M <= 16 && a.R >= 1 && a.R <= kMaxRank && a.K % 8 == 0 && a.D >= 1,
              "lora_fused.lora_decode: internal: the bulk-copy kernel got M=", a.M, " R=", a.R, " K=", a.K, " D=", a.D);
  const int rows = env_choice("LORA_FUSED_DECODE_ROWS", 16, {16, 32});
  const int stages = env_choice("LORA_FUSED_DECODE_STAGES", 0, {2, 3, 4, 5, 6, 7, 8});  // 0: launch's default
  if (dtype == at::kBFloat16) {
    launch_rows<at::BFloat16>(a, rows, stages, pdl, stream);
  } else {
    TORCH_CHECK(dtype == at::kHalf, "lora_fused.lora_decode: internal: the bulk-copy kernel got ", dtype);
    launch_rows<at::Half>(a, rows, stages, pdl, stream);
  }
}

}  // namespace cuda
}  // namespace lora_fused
