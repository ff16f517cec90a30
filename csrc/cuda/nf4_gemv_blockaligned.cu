// nf4_linear for a few rows of x (M <= 16, decode) when every quantization block starts a 64-column
// group of its row (K % blocksize == 0, blocksize >= 64: every LLM layer): out = x @ W^T + bias +
// lora_u @ lora_B^T, the NF4 weight streamed once from memory, on tensor cores.
//
// Tiling as nf4_gemv.cu: a block takes strips of 16 weight rows (persistent over N), its 8 warps split
// K; a warp step is 16 rows x 128 columns, lane t of row group g holding 32 columns (16 bytes) of rows
// g and g+8 at chunk c0 + t, k-permuted so that each mma.m16n8k16 takes 4 columns from each lane.
// What differs, for bandwidth:
// - The weight bytes come through a ring of S steps per warp in shared memory (cp.async, 16 bytes a
//   lane), S - 1 steps ahead and across strip boundaries; each lane reads back only what it copied,
//   so no barrier is needed. (nf4_gemv.cu keeps one step in registers: too few bytes in flight.)
// - The scale is applied after the mma, not per element: the table gives the 16-bit levels of a
//   byte's two nibbles unscaled (one 4-byte lookup per 2 weights, no multiply, no conversion), an mma
//   group accumulates over the 128 columns of a step, and acc += scale * group. This is right when all
//   16 k of an mma share one scale per row: with blocksize >= 128 the 128-column window lies in one
//   block; with blocksize 64 lanes 0-1 are in one block and lanes 2-3 in the next, so two mma groups
//   run, each with x zeroed in the other pair's lanes.
// Rounding differs from dequantize-then-matmul: the weight enters the mma as the 16-bit level (not
// level * scale rounded), the scale multiplies the fp32 sum; both round each weight once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/common.cuh"
#include "cuda/mma_sm80.cuh"
#include "cuda/nf4_decode.cuh"
#include "cuda/nf4_gemv.cuh"

namespace lora_fused {
namespace cuda {
namespace {

constexpr int kWarps = kGemvWarps, kThreads = kGemvThreads;
constexpr int kTableEntries = 256 * 32;  // byte x lane: a warp's lookups hit 32 different banks

// A step's scale sources for G groups x R strips x rows {g, g + 8}: fp32 bits, or the 8-bit code
// with its nested fp32 scale; bit (G, i, h) of `ok` is clear past the end (the scale is then 0).
template <int G, int R>
struct StepScales {
  uint32_t raw[G][R][2];
  float s2[G][R][2];
  uint32_t ok;
};

template <int G, int R>
__device__ __forceinline__ void load_scales(StepScales<G, R>& sc, const GemvArgs& a, int64_t strip, int64_t strips,
                                            int64_t c0, int64_t chunks) {
  const int g = (threadIdx.x & 31) >> 2;
  sc.ok = 0;
#pragma unroll
  for (int grp = 0; grp < G; ++grp)
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = strip * 16 * R + 16 * i + 8 * h + g, c = c0 + 2 * grp;
        const bool ok = strip < strips && c < chunks && row < a.n;
        const int64_t blk = (row * a.k + 32 * c) >> a.bs_shift;
        if (a.scales.absmax != nullptr) {
          sc.raw[grp][i][h] = ok ? __float_as_uint(__ldg(a.scales.absmax + blk)) : 0u;
          sc.s2[grp][i][h] = 0.0f;
        } else {
          sc.raw[grp][i][h] = ok ? __ldg(a.scales.codes + blk) : 0u;
          const int64_t b2 = a.scales.nested_shift >= 0 ? blk >> a.scales.nested_shift : blk / a.scales.nested_blocksize;
          sc.s2[grp][i][h] = ok ? __ldg(a.scales.nested_absmax + b2) : 0.0f;
        }
        sc.ok |= (ok ? 1u : 0u) << ((grp * R + i) * 2 + h);
      }
}

// Copies one warp step's weight bytes (R strips x rows {g, g + 8}, 16 bytes a lane) into its ring
// slot; past the end, zeros (whose scale or x is 0, or whose row is never stored).
template <int R>
__device__ __forceinline__ void issue_step(uint4* slot, const GemvArgs& a, int64_t strip, int64_t strips, int64_t c0,
                                           int64_t chunks) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t c = c0 + t;
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = strip * 16 * R + 16 * i + 8 * h + g;
      const bool ok = strip < strips && c < chunks && row < a.n;
      const uint8_t* src = ok ? a.packed + (row * a.k + 32 * c) / 2 : a.packed;
      cp_async_16(smem_u32(slot + (2 * i + h) * 32 + lane), src, ok ? 16 : 0);
    }
  cp_async_commit();
}

template <typename T, int R, int NT, int S, int G>
__global__ void __launch_bounds__(kThreads, 2) nf4_gemv_blockaligned_kernel(const GemvArgs args) {
  extern __shared__ float4 smem_raw[];
  constexpr int kSlot = 2 * R * 32;  // uint4 per warp per ring slot
  uint4* ring = reinterpret_cast<uint4*>(smem_raw);
  uint32_t* table = reinterpret_cast<uint32_t*>(ring + kWarps * S * kSlot);
  float* code2 = reinterpret_cast<float*>(table + kTableEntries);
  float* red = code2 + 256;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  uint4* my_ring = ring + warp * S * kSlot;

  const int64_t n = args.n, k = args.k, chunks = k / 32;
  const int64_t strips = ceil_div<int64_t>(n, 16 * R);
  // The ring fills while the tables are built. A warp's steps run over its chunks c0 = 4 warp,
  // 4 warp + 32, ... of each of the block's strips in turn.
  int64_t p_strip = blockIdx.x, p_c0 = 4 * warp;
#pragma unroll 1
  for (int s = 0; s < S - 1; ++s) {
    issue_step<R>(my_ring + s * kSlot, args, p_strip, strips, p_c0, chunks);
    p_c0 += 4 * kWarps;
    if (p_c0 >= chunks) p_c0 = 4 * warp, p_strip += gridDim.x;
  }
  for (int i = threadIdx.x; i < kTableEntries; i += kThreads) {
    const int b = i >> 5;
    table[i] = pack2<T>(nf4::level(b >> 4), nf4::level(b & 15));  // element 2j (high nibble): the lower k
  }
  const bool nested = args.scales.absmax == nullptr;
  if (nested) code2[threadIdx.x] = args.scales.nested_code[threadIdx.x];
  __syncthreads();

  const T* x = static_cast<const T*>(args.x);
  const uint32_t* my_table = table + lane;
  // With two groups, group 0 is lanes t = 0, 1 (chunks c0, c0 + 1), group 1 lanes t = 2, 3.
  const uint32_t keep0 = (G == 1 || t < 2) ? ~0u : 0u;
  int slot = 0;
  StepScales<G, R> sc_cur, sc_nxt;
  load_scales<G, R>(sc_cur, args, blockIdx.x, strips, 4 * warp, chunks);
  for (int64_t strip = blockIdx.x; strip < strips; strip += gridDim.x) {
    float acc[R][NT][4];
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;
    for (int64_t c0 = 4 * warp; c0 < chunks; c0 += 4 * kWarps) {
      const int64_t c = c0 + t;
      uint4 xq[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int tok = 8 * j + g;
        const bool ok = c < chunks && tok < args.m;
        const uint4* src = reinterpret_cast<const uint4*>(x + tok * k + 32 * c);
#pragma unroll
        for (int q = 0; q < 4; ++q) xq[j][q] = ok ? __ldg(src + q) : make_uint4(0, 0, 0, 0);
      }
      {  // the next step's scales, one step ahead
        int64_t ns = strip, nc = c0 + 4 * kWarps;
        if (nc >= chunks) nc = 4 * warp, ns += gridDim.x;
        load_scales<G, R>(sc_nxt, args, ns, strips, nc, chunks);
      }
      cp_async_wait<S - 2>();
      uint4 w[R][2];
#pragma unroll
      for (int i = 0; i < R; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) w[i][h] = my_ring[slot * kSlot + (2 * i + h) * 32 + lane];
      // Refill the slot read one step ago (this lane's own bytes: read into registers already).
      issue_step<R>(my_ring + ((slot + S - 1) % S) * kSlot, args, p_strip, strips, p_c0, chunks);
      p_c0 += 4 * kWarps;
      if (p_c0 >= chunks) p_c0 = 4 * warp, p_strip += gridDim.x;
      slot = (slot + 1) % S;

      float part[G][R][NT][4];
#pragma unroll
      for (int grp = 0; grp < G; ++grp)
#pragma unroll
        for (int i = 0; i < R; ++i)
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) part[grp][i][j][q] = 0.0f;
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        // Step s: columns 4s..4s+3 of the chunk = packed bytes 2s, 2s+1 = word s/2, bytes 2(s%2), +1.
        const int shift = 16 * (s & 1);
        uint32_t b0[NT], b1[NT];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          b0[j] = word_of(xq[j][s / 2], (2 * s) % 4);
          b1[j] = word_of(xq[j][s / 2], (2 * s) % 4 + 1);
        }
#pragma unroll
        for (int i = 0; i < R; ++i) {
          const uint32_t lo = word_of(w[i][0], s / 2) >> shift, hi = word_of(w[i][1], s / 2) >> shift;
          uint32_t a[4];
          a[0] = my_table[(lo & 0xffu) << 5];         // row g,   columns 4s, 4s+1
          a[1] = my_table[(hi & 0xffu) << 5];         // row g+8, columns 4s, 4s+1
          a[2] = my_table[((lo >> 8) & 0xffu) << 5];  // row g,   columns 4s+2, 4s+3
          a[3] = my_table[((hi >> 8) & 0xffu) << 5];  // row g+8, columns 4s+2, 4s+3
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            mma16816<T>(part[0][i][j], a, b0[j] & keep0, b1[j] & keep0);
            if (G == 2) mma16816<T>(part[G - 1][i][j], a, b0[j] & ~keep0, b1[j] & ~keep0);
          }
        }
      }
#pragma unroll
      for (int grp = 0; grp < G; ++grp)
#pragma unroll
        for (int i = 0; i < R; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float s = 0.0f;
            if (sc_cur.ok & (1u << ((grp * R + i) * 2 + h)))
              s = nested ? __fadd_rn(__fmul_rn(code2[sc_cur.raw[grp][i][h]], sc_cur.s2[grp][i][h]), args.scales.offset)
                         : __uint_as_float(sc_cur.raw[grp][i][h]);
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
              for (int q = 2 * h; q < 2 * h + 2; ++q) acc[i][j][q] = fma_acc(s, part[grp][i][j][q], acc[i][j][q]);
          }
      sc_cur = sc_nxt;
    }
    gemv_finish_strip<T, R, NT>(args, red, acc, strip * 16 * R);
  }
  cp_async_wait<0>();  // the steps issued past the block's last strip
}

template <typename T, int R, int NT, int S, int G>
void launch(const GemvArgs& a, cudaStream_t stream, int sms) {
  constexpr size_t smem = sizeof(uint4) * kWarps * S * 2 * R * 32 + sizeof(uint32_t) * kTableEntries +
                          sizeof(float) * 256 + gemv_reduction_bytes<R, NT>();
  opt_in_dynamic_smem<nf4_gemv_blockaligned_kernel<T, R, NT, S, G>>(smem);
  const int64_t strips = ceil_div<int64_t>(a.n, 16 * R);
  const int grid = static_cast<int>(std::min<int64_t>(strips, 2LL * sms));
  nf4_gemv_blockaligned_kernel<T, R, NT, S, G><<<grid, kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int NT>
void launch_groups(const GemvArgs& a, cudaStream_t stream, int sms) {
  // One strip of 16 rows per block step (strips of 32 left the last wave of 8192->28672 60% empty);
  // 8 ring slots: 7 steps of 16 bytes a lane in flight per warp, two blocks per SM.
  if (a.bs_shift == 6) {
    launch<T, 1, NT, 8, 2>(a, stream, sms);
  } else {
    launch<T, 1, NT, 8, 1>(a, stream, sms);
  }
}

}  // namespace

void nf4_gemv_blockaligned_launch(const GemvArgs& a, at::ScalarType dtype, cudaStream_t stream, int sms) {
  if (dtype == at::kBFloat16) {
    if (a.m <= 8) launch_groups<at::BFloat16, 1>(a, stream, sms); else launch_groups<at::BFloat16, 2>(a, stream, sms);
  } else {
    if (a.m <= 8) launch_groups<at::Half, 1>(a, stream, sms); else launch_groups<at::Half, 2>(a, stream, sms);
  }
}

}  // namespace cuda
}  // namespace lora_fused
