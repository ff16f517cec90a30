// lora_decode's tensor-core kernel (lora_decode_mma.h), for M = 2..16 tokens, where a CUDA-core dot
// product per token costs more than streaming W. Swapped operands: out^T[D, M] = W[D, K] x^T, so the
// weight rows are the mma's 16 rows and the tokens its 8 (or 2 x 8) columns. Each lane loads 16
// bytes (8 consecutive k) of two weight rows straight from global memory into its A fragments and 16
// bytes of x into its B fragment: the k order inside an m16n8k16 step is permuted the same way for
// A and B (fragment k 2t + e and 2t + 8 + e are k 8t + e and 8t + 2 + e, t = lane % 4), which a dot
// product does not see. No shared memory on the weight path, U steps of loads in flight per lane.
// A block: 16 weight rows x 8 warps splitting K; their fp32 partials meet in
// shared memory, where the LoRA term (u from the shrink kernel's partial sums, scaled once) and the
// bias join before a single rounding. The block's 16 lora_B rows are copied to shared memory
// (cp.async) as the kernel starts, so their loads hide behind the weight stream: read from global
// memory in the epilogue, a thread's serial loads of one B row cost r round trips a block (r = 64 at
// 16 tokens took 1.3-1.9x the r = 16 time, session 34).
#include "cuda/lora_decode_mma.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdlib>
#include <cstring>

#include "cuda/common.cuh"
#include "cuda/lora_shrink_partials.h"
#include "cuda/mma_sm80.cuh"
#include "cuda/pdl.cuh"
#include "cuda/stream_load.cuh"
#include "cuda/unpack16.cuh"

namespace lora_fused {
namespace cuda {

bool lora_decode_stream_hints(int64_t weight_bytes) {
  const char* v = std::getenv("LORA_FUSED_DECODE_STREAM_HINTS");
  if (v == nullptr || *v == '\0') return weight_bytes > at::cuda::getCurrentDeviceProperties()->l2CacheSize;
  TORCH_CHECK(std::strcmp(v, "0") == 0 || std::strcmp(v, "1") == 0, "LORA_FUSED_DECODE_STREAM_HINTS must be 0 or 1, got '", v,
              "'");
  return v[0] == '1';
}

bool lora_decode_u_together() {
  const char* v = std::getenv("LORA_FUSED_DECODE_U_TOGETHER");
  if (v == nullptr || *v == '\0') return true;
  TORCH_CHECK(std::strcmp(v, "0") == 0 || std::strcmp(v, "1") == 0, "LORA_FUSED_DECODE_U_TOGETHER must be 0 or 1, got '", v,
              "'");
  return v[0] == '1';
}

namespace {

// 16 weight rows a block (each warp's mma rows: rows g and g + 8 of the block), so that a block's share
// of W is small and the last partial wave of blocks short (32-row blocks ran 8192->28672 at 184 us
// against 162 for the 16-row CUDA-core kernel; 32 and 8 rows a warp both lost to 16, session 30).
constexpr int kRows = 16;
constexpr int kSplits = 8;   // warps splitting K per block
constexpr int kThreads = kSplits * 32;
constexpr int kMaxRank = 256;
constexpr int kUnroll = 4;   // 32-column steps whose loads are in flight together
constexpr int kUBatch = 4;   // elements of u a thread loads together
// lora_B rows in shared memory: r rounded up to 8, then to 64, plus 8 elements, so that the 16 rows'
// 16-byte chunks at one column fall on distinct bank groups (two wavefronts for 16 rows).
constexpr int kBStrideMax = kMaxRank + 8;
__host__ __device__ constexpr int b_stride(int r8) { return ((r8 + 63) / 64) * 64 + 8; }
static_assert(b_stride(kMaxRank) == kBStrideMax, "the shared lora_B tile holds the widest rank");

// acc + the dot product of 8 packed 16-bit values of b with 8 floats (u0, u1).
template <typename T>
__device__ __forceinline__ float dot8_f32(const uint4& b, const float4& u0, const float4& u1, float acc) {
  float2 v = unpack2(b.x, T());
  acc = fmaf(u0.x, v.x, acc);
  acc = fmaf(u0.y, v.y, acc);
  v = unpack2(b.y, T());
  acc = fmaf(u0.z, v.x, acc);
  acc = fmaf(u0.w, v.y, acc);
  v = unpack2(b.z, T());
  acc = fmaf(u1.x, v.x, acc);
  acc = fmaf(u1.y, v.y, acc);
  v = unpack2(b.w, T());
  acc = fmaf(u1.z, v.x, acc);
  acc = fmaf(u1.w, v.y, acc);
  return acc;
}

// kStream: the weight's loads with streaming hints (load_nc16_hinted), where the weight is larger than L2
// (lora_decode_stream_hints).
template <typename T, int NT, bool kStream>
__global__ void __launch_bounds__(kThreads, 2) lora_decode_mma_kernel(const LoraDecodeArgs a) {
  __shared__ float red[kSplits][kRows][16 + 1];
  __shared__ __align__(16) float us[16][kMaxRank];
  __shared__ __align__(16) uint16_t bs[kRows * kBStrideMax];  // the block's lora_B rows (T's bits)
  const int ks = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t f0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const T* bm = static_cast<const T*>(a.b);
  const int r8 = (a.R + 7) / 8 * 8, bstride = b_stride(r8);
  // Rows of 16-byte chunks: cp.async now, waited for in the epilogue (rows past D copy row D - 1).
  const bool b_async = a.b_sr == 1 && a.b_sd % 8 == 0 && a.R % 8 == 0 && reinterpret_cast<uintptr_t>(a.b) % 16 == 0;
  if (b_async) {
    const int chunks = r8 / 8;
    for (int i = threadIdx.x; i < kRows * chunks; i += kThreads) {
      const int r = i / chunks, q = i % chunks;
      const int64_t f = f0 + r < a.D ? f0 + r : a.D - 1;
      cp_async_16(smem_u32(bs + r * bstride + 8 * q), bm + f * a.b_sd + 8 * q, 16);
    }
    cp_async_commit();
  }
  // Rows g and 8 + g of the block (rows past D read row D - 1; they are never stored).
  const T* wr[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = f0 + 8 * h + g < a.D ? f0 + 8 * h + g : a.D - 1;
    wr[h] = static_cast<const T*>(a.w) + row * a.ldw + 8 * t;
  }
  const T* xr[NT];
  bool xin[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int m = g + 8 * n;
    xin[n] = m < a.M;
    xr[n] = static_cast<const T*>(a.x) + (xin[n] ? m : 0) * a.ldx + 8 * t;
  }
  float c[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.0f;

  const uint4 zero = make_uint4(0, 0, 0, 0);
  const int64_t steps = (a.K + 31) / 32;
  // A warp's kUnroll steps of a batch are consecutive (256 contiguous bytes per row with U = 4), the
  // block's 8 warps side by side: interleaving the warps' steps instead (512 bytes apart) ran
  // 8192-wide rows at ~80% of cuBLAS's rate.
  for (int64_t s0 = ks * kUnroll; s0 < steps; s0 += kSplits * kUnroll) {
    uint4 vw[kUnroll][2], vx[kUnroll][NT];
    bool ok[kUnroll];
    // Every load first (out-of-range steps read column 0 and are zeroed after): all in flight at once.
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      const int64_t col = (s0 + i) * 32 + 8 * t;
      ok[i] = s0 + i < steps && col < a.K;
      const int64_t c0 = ok[i] ? col - 8 * t : 0;
#pragma unroll
      for (int h = 0; h < 2; ++h) vw[i][h] = load_nc16_hinted<kStream>(wr[h] + c0);
#pragma unroll
      for (int n = 0; n < NT; ++n) vx[i][n] = __ldg(reinterpret_cast<const uint4*>(xr[n] + c0));
    }
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h)
        if (!ok[i]) vw[i][h] = zero;
#pragma unroll
      for (int n = 0; n < NT; ++n)
        if (!ok[i] || !xin[n]) vx[i][n] = zero;
      const uint4 va = vw[i][0], vb = vw[i][1];
      const uint32_t a0[4] = {va.x, vb.x, va.y, vb.y};  // k 8t..8t+3
      const uint32_t a1[4] = {va.z, vb.z, va.w, vb.w};  // k 8t+4..8t+7
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        mma16816<T>(c[n], a0, vx[i][n].x, vx[i][n].y);
        mma16816<T>(c[n], a1, vx[i][n].z, vx[i][n].w);
      }
    }
  }
  // c[n]: rows g, g + 8 of the block, tokens 2t, 2t + 1 (+ 8n).
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int m = 2 * t + 8 * n;
    red[ks][g][m] = c[n][0];
    red[ks][g][m + 1] = c[n][1];
    red[ks][g + 8][m] = c[n][2];
    red[ks][g + 8][m + 1] = c[n][3];
  }
  // u only now: the shrink kernel (programmatic dependent launch) ran beside the weight stream.
  // Nothing hides these loads, so a thread's kUBatch elements (u [16][64]: all of them) are loaded
  // together, then summed in split order; a.u_together off: one element (a round trip) at a time.
  if (a.u == nullptr) pdl_wait();
  const int ub = a.u_together ? kUBatch : 1;
  for (int i0 = threadIdx.x; i0 < a.M * r8; i0 += ub * kThreads) {
    float v[kUBatch][kLoraShrinkMaxSplits];
#pragma unroll
    for (int e = 0; e < kUBatch; ++e) {
      const int i = i0 + e * kThreads, m = i / r8, j = i % r8;
      const bool in = e < ub && i < a.M * r8 && j < a.R;  // ranks r..r8 - 1: zeros
#pragma unroll
      for (int sp = 0; sp < kLoraShrinkMaxSplits; ++sp) {
        v[e][sp] = 0.0f;
        if (in && a.u != nullptr && sp == 0) v[e][0] = static_cast<float>(static_cast<const T*>(a.u)[m * a.ldu + j]);
        if (in && a.u == nullptr && sp < a.splits) v[e][sp] = a.parts[(sp * a.M + m) * a.R + j];
      }
    }
#pragma unroll
    for (int e = 0; e < kUBatch; ++e) {
      const int i = i0 + e * kThreads;
      if (e < ub && i < a.M * r8) {
        float s = v[e][0];  // lora_shrink_sum's order: 0 + parts[0] + parts[1] + ...
        if (a.u == nullptr) {
          s = 0.0f;
#pragma unroll
          for (int sp = 0; sp < kLoraShrinkMaxSplits; ++sp)
            if (sp < a.splits) s += v[e][sp];
        }
        us[i / r8][i % r8] = s * a.scale;
      }
    }
  }
  if (!b_async) {  // any strides: element loads, coalesced along a row
#pragma unroll 4
    for (int i = threadIdx.x; i < kRows * r8; i += kThreads) {
      const int r = i / r8, j = i % r8;
      const int64_t f = f0 + r < a.D ? f0 + r : a.D - 1;
      bs[r * bstride + j] = j < a.R ? bm[f * a.b_sd + j * a.b_sr].x : uint16_t{0};
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  // The LoRA term of output (row r, token m) from P threads (consecutive lanes, each every P-th
  // 8-rank chunk, summed in a fixed order by shuffles): P = 16 at one token, 1 at 16.
  const int outs = kRows * a.M;
  int P = 16;
  while (P > 1 && P * outs > kThreads) P /= 2;
  const int o = threadIdx.x / P, p = threadIdx.x % P, r = o % kRows, m = o / kRows;
  float lv = 0.0f;
  if (o < outs) {
    const uint4* brow = reinterpret_cast<const uint4*>(bs + r * bstride);
    const float4* urow = reinterpret_cast<const float4*>(us[m]);
    for (int q = p; q < r8 / 8; q += P) lv = dot8_f32<T>(brow[q], urow[2 * q], urow[2 * q + 1], lv);
  }
  for (int off = P / 2; off > 0; off /= 2) lv += __shfl_xor_sync(0xffffffffu, lv, off);
  const T* bias = static_cast<const T*>(a.bias);
  T* out = static_cast<T*>(a.out);
  const int64_t f = f0 + r;
  if (o < outs && p == 0 && f < a.D) {
    float v = 0.0f;
#pragma unroll
    for (int sp = 0; sp < kSplits; ++sp) v += red[sp][r][m];
    v += lv;
    if (bias != nullptr) v += static_cast<float>(bias[f]);
    out[m * a.D + f] = static_cast<T>(v);
  }
}

template <typename T, int NT, bool kStream>
void launch(const LoraDecodeArgs& a, bool pdl, cudaStream_t stream) {
  const unsigned int grid = grid_x(ceil_div<int64_t>(a.D, kRows), "lora_fused.lora_decode");
  launch_maybe_pdl(pdl, lora_decode_mma_kernel<T, NT, kStream>, dim3(grid), dim3(kThreads), 0, stream, a);
}

template <typename T>
void launch_for(const LoraDecodeArgs& a, bool pdl, bool hints, cudaStream_t stream) {
  if (a.M <= 8) {
    hints ? launch<T, 1, true>(a, pdl, stream) : launch<T, 1, false>(a, pdl, stream);
  } else {
    hints ? launch<T, 2, true>(a, pdl, stream) : launch<T, 2, false>(a, pdl, stream);
  }
}

}  // namespace

void lora_decode_mma_launch(const LoraDecodeArgs& a, at::ScalarType dtype, bool pdl, bool stream_hints, cudaStream_t stream) {
  TORCH_CHECK(a.M >= 1 && a.M <= 16 && a.R >= 1 && a.R <= kMaxRank && a.K % 8 == 0,
              "lora_fused.lora_decode: internal: the tensor-core kernel got M=", a.M, " R=", a.R, " K=", a.K);
  if (dtype == at::kBFloat16) {
    launch_for<at::BFloat16>(a, pdl, stream_hints, stream);
  } else {
    TORCH_CHECK(dtype == at::kHalf, "lora_fused.lora_decode: internal: the tensor-core kernel got ", dtype);
    launch_for<at::Half>(a, pdl, stream_hints, stream);
  }
}

}  // namespace cuda
}  // namespace lora_fused
