// nf4_linear for a few rows of x (M <= 16, decode) when every quantization block starts a 64-column
// group of its row (K % 128 == 0, K % blocksize == 0, blocksize >= 64: every LLM layer):
// out = x @ W^T + bias + lora_u @ lora_B^T, the NF4 weight streamed once from memory, on tensor cores.
//
// Tiling: a block takes strips of 16 weight rows (persistent over N), its 8 warps split K. A warp
// step is 16 rows x 128 columns = two 64-column pieces; lane t of row group g holds 16 columns
// (8 bytes) of rows g and g+8 in each piece, at columns 64p + 16t. Each mma.m16n8k16 takes 4 columns
// from each of the 4 lanes of a piece (k-permuted: an mma sums its 16 k in any order, so lane t's
// logical k {2t, 2t+1, 2t+8, 2t+9} at step s are physical columns 16t + 4s + {0..3} of the piece, in
// A and in x alike), so all 16 k of an mma lie in one quantization block per row.
// Why it reaches the bandwidth nf4_gemv.cu does not:
// - The scale is applied after the mma: the table gives the two 16-bit levels of a byte unscaled
//   (one 4-byte lookup per 2 weights, no multiply, no conversion), each piece accumulates in fp32,
//   and acc += scale(row, block) * piece. Rounding: each weight enters the mma as its 16-bit level
//   (dequantize-then-matmul rounds level * scale instead), and the scale multiplies an fp32 sum.
// - The weight bytes come through a ring of S steps per warp in shared memory (cp.async.cg, 16 bytes
//   a lane, past L1), S - 1 steps ahead and across strip boundaries, XOR-swizzled so that copies and
//   reads are free of bank conflicts; a __syncwarp orders a lane's reads after other lanes' copies.
// - The shared-memory pipe (table lookups, ring, scale and x loads) is the limit: ncu on the H100
//   showed L1 74% busy at 33% of DRAM bandwidth for 8-byte cp.async.ca copies and six scale loads
//   per step, hence 16-byte copies, one load of both pieces' codes, and nested scales reused.
// On the H100 the first version of this kernel (16-byte lane chunks, a blocksize-64 window split
// over two masked mma groups, 64-bit scale addressing) issued ~600 instructions per KiB of weight
// and was slower than nf4_gemv.cu: decode is bound by instruction issue as much as by memory.
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
constexpr int kSlot = 16 * 4;            // uint4 per warp per ring slot: 16 rows x 64 bytes (swizzled)

// Where 16-byte chunk c (of 4) of row r (of 16) sits in a ring slot: XOR-swizzled by row so that the
// 8-byte reads of a warp (8 rows x 4 lanes) and its 16-byte copies each hit every bank equally.
__device__ __forceinline__ int slot_chunk(int r, int c) { return 4 * r + (c ^ ((r >> 1) & 3)); }

// Where a warp step is, with this lane's offsets: its window is chunks c0..c0+3 of the strip's rows
// (lane t's piece p at columns 32 c0 + 64 p + 16 t of rows g and g + 8). 64-bit products only when
// the strip changes (every K / 1024 steps); steps within a strip add constants.
struct Cursor {
  int64_t strip;
  int c0;
  int64_t w_off;  // byte of (row g, column 32 c0 + 32 t) in packed: lane t copies chunk t of the window
  int64_t row_blk;  // first block of row g
  bool ok0, ok8;  // rows g and g + 8 exist (false past the last strip)

  __device__ __forceinline__ void start_strip(const GemvArgs& a, int64_t s, int64_t strips) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    strip = s;
    c0 = 4 * (threadIdx.x >> 5);
    const int64_t row = s * 16 + g;
    w_off = row * (a.k / 2) + 16 * c0 + 16 * t;
    row_blk = row * (a.k >> a.bs_shift);
    ok0 = s < strips && row < a.n;
    ok8 = s < strips && row + 8 < a.n;
  }
  __device__ __forceinline__ void advance(const GemvArgs& a, int64_t strips) {
    c0 += 4 * kWarps;
    w_off += 16 * 4 * kWarps;
    if (32 * c0 >= a.k) start_strip(a, strip + gridDim.x, strips);
  }
};

// Copies a warp step's weight bytes (16 rows x 64 bytes) into its ring slot, lane (g, t) chunk t of
// rows g and g + 8 (16 bytes each, past L1); rows past the end read zeros (never stored).
__device__ __forceinline__ void issue_step(uint4* slot, const GemvArgs& a, const Cursor& cur) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const uint8_t* src = a.packed + cur.w_off;
  cp_async_16(smem_u32(slot + slot_chunk(g, t)), cur.ok0 ? src : a.packed, cur.ok0 ? 16 : 0);
  cp_async_16(smem_u32(slot + slot_chunk(g + 8, t)), cur.ok8 ? src + 4 * a.k : a.packed, cur.ok8 ? 16 : 0);
  cp_async_commit();
}

// A step's block scales for 2 pieces x rows {g, g + 8}: fp32 bits, or the 8-bit code and its nested
// fp32 scale (decoded when used; one nested scale per row: with K % 128 == 0 both pieces' blocks
// are in one group of 2^nested_shift >= 2). Rows past the end: zeros.
// With blocksize 64 the two pieces' blocks are blk and blk + 1 (blk even): one 2-byte (8-byte) load
// of both codes (scales); the nested scale is loaded again only when its group changes (every
// 2^nested_shift blocks), else taken from the previous step (`prev`).
template <bool kNested>
struct StepScales {
  uint32_t raw[2][2];
  float s2[2];
  int64_t s2_group[2];
};

template <bool kNested>
__device__ __forceinline__ void load_scales(StepScales<kNested>& sc, const StepScales<kNested>& prev, const GemvArgs& a,
                                            const Cursor& cur) {
  const int64_t rows8 = 8 * (a.k >> a.bs_shift);
  const bool pair = a.bs_shift == 6;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const bool ok = h == 0 ? cur.ok0 : cur.ok8;
    const int64_t blk = cur.row_blk + (h == 0 ? 0 : rows8) + ((32 * cur.c0) >> a.bs_shift);
    if (kNested) {
      uint32_t c01 = 0;
      if (ok) c01 = pair ? __ldg(reinterpret_cast<const unsigned short*>(a.scales.codes + blk)) : __ldg(a.scales.codes + blk);
      sc.raw[0][h] = c01 & 0xffu;
      sc.raw[1][h] = pair ? c01 >> 8 : c01;
      const int64_t group = blk >> a.scales.nested_shift;
      sc.s2_group[h] = ok ? group : -1;
      sc.s2[h] = !ok ? 0.0f : group == prev.s2_group[h] ? prev.s2[h] : __ldg(a.scales.nested_absmax + group);
    } else {
      float2 v = make_float2(0.0f, 0.0f);
      if (ok) {
        if (pair) {
          v = __ldg(reinterpret_cast<const float2*>(a.scales.absmax + blk));
        } else {
          v.x = v.y = __ldg(a.scales.absmax + blk);
        }
      }
      sc.raw[0][h] = __float_as_uint(v.x);
      sc.raw[1][h] = __float_as_uint(v.y);
    }
  }
}

// The two 16-bit levels of byte i of w, from this lane's copy of the table (i is a constant).
__device__ __forceinline__ uint32_t lookup(const char* table_lane, uint32_t w, int i) {
  const uint32_t off = (i == 0 ? w << 7 : w >> (8 * i - 7)) & 0x7f80u;  // byte * 32 lanes * 4 bytes
  return *reinterpret_cast<const uint32_t*>(table_lane + off);
}

template <typename T, int NT, int S, bool kNested>
__global__ void __launch_bounds__(kThreads, 2) nf4_gemv_blockaligned_kernel(const GemvArgs args) {
  extern __shared__ float4 smem_raw[];
  uint4* ring = reinterpret_cast<uint4*>(smem_raw);
  uint32_t* table = reinterpret_cast<uint32_t*>(ring + kWarps * S * kSlot);
  float* code2 = reinterpret_cast<float*>(table + kTableEntries);
  float* red = code2 + 256;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  uint4* my_ring = ring + warp * S * kSlot;
  const int64_t strips = ceil_div<int64_t>(args.n, 16);
  // The ring fills while the tables are built. A warp's steps run over its windows c0 = 4 warp,
  // 4 warp + 32, ... of each of the block's strips in turn (a warp with none, K < 128 (warp + 1),
  // only joins the reductions).
  const bool has_work = 128 * warp < args.k;
  Cursor prod;
  prod.start_strip(args, blockIdx.x, strips);
  if (has_work) {
#pragma unroll 1
    for (int s = 0; s < S - 1; ++s) {
      issue_step(my_ring + s * kSlot, args, prod);
      prod.advance(args, strips);
    }
  }
  for (int i = threadIdx.x; i < kTableEntries; i += kThreads) {
    const int b = i >> 5;
    table[i] = pack2<T>(nf4::level(b >> 4), nf4::level(b & 15));  // element 2j (high nibble): the lower k
  }
  if (kNested) code2[threadIdx.x] = args.scales.nested_code[threadIdx.x];
  __syncthreads();

  // x: token 8j + g, this lane's 16 columns of each piece; tokens past M read nothing (zeros).
  const T* x_lane[NT];
  bool x_ok[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    x_ok[j] = 8 * j + g < args.m;
    x_lane[j] = static_cast<const T*>(args.x) + (x_ok[j] ? (8 * j + g) * args.k : 0) + 16 * t;
  }
  const char* table_lane = reinterpret_cast<const char*>(table + lane);
  int slot = 0;
  Cursor pos;
  pos.start_strip(args, blockIdx.x, strips);
  StepScales<kNested> sc_cur, sc_nxt;
  sc_nxt.s2_group[0] = sc_nxt.s2_group[1] = -1;
  load_scales<kNested>(sc_cur, sc_nxt, args, pos);
  for (int64_t strip = blockIdx.x; strip < strips; strip += gridDim.x) {
    float acc[1][NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[0][j][q] = 0.0f;
    for (; has_work && pos.strip == strip;) {
      uint4 xq[NT][2][2];
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          const uint4* src = reinterpret_cast<const uint4*>(x_lane[j] + 32 * pos.c0 + 64 * p);
          xq[j][p][0] = x_ok[j] ? __ldg(src) : make_uint4(0, 0, 0, 0);
          xq[j][p][1] = x_ok[j] ? __ldg(src + 1) : make_uint4(0, 0, 0, 0);
        }
      Cursor next = pos;
      next.advance(args, strips);
      load_scales<kNested>(sc_nxt, sc_cur, args, next);  // one step ahead
      cp_async_wait<S - 2>();
      __syncwarp();  // the slot's chunks were copied by other lanes of the warp
      // Lane (g, t), piece p: 8 bytes of rows g and g + 8 at byte 8t + 32p = chunk t/2 + 2p, half t%2.
      uint2 w[2][2];
#pragma unroll
      for (int p = 0; p < 2; ++p)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          w[p][h] = reinterpret_cast<const uint2*>(my_ring + slot * kSlot + slot_chunk(g + 8 * h, (t >> 1) + 2 * p))[t & 1];
      // Refill the slot read one step ago: every lane has passed this step's __syncwarp, so all
      // of them have read it.
      issue_step(my_ring + (slot == 0 ? S - 1 : slot - 1) * kSlot, args, prod);
      prod.advance(args, strips);
      slot = slot == S - 1 ? 0 : slot + 1;

#pragma unroll
      for (int p = 0; p < 2; ++p) {
        float part[NT][4];
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int q = 0; q < 4; ++q) part[j][q] = 0.0f;
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          // Step s: columns 4s..4s+3 of the lane's 16 = bytes 2s, 2s+1 = word s/2, bytes 2(s%2), +1.
          const uint32_t lo = s < 2 ? w[p][0].x : w[p][0].y, hi = s < 2 ? w[p][1].x : w[p][1].y;
          const int b = 2 * (s & 1);
          uint32_t a[4];
          a[0] = lookup(table_lane, lo, b);      // row g,   columns 4s, 4s+1
          a[1] = lookup(table_lane, hi, b);      // row g+8, columns 4s, 4s+1
          a[2] = lookup(table_lane, lo, b + 1);  // row g,   columns 4s+2, 4s+3
          a[3] = lookup(table_lane, hi, b + 1);  // row g+8, columns 4s+2, 4s+3
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            const uint4& xv = xq[j][p][s / 2];
            mma16816<T>(part[j], a, s % 2 == 0 ? xv.x : xv.z, s % 2 == 0 ? xv.y : xv.w);
          }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // Rows past the end: a finite scale (0, or the offset) on a row that is never stored.
          const float scale = kNested ? __fadd_rn(__fmul_rn(code2[sc_cur.raw[p][h]], sc_cur.s2[h]), args.scales.offset)
                                      : __uint_as_float(sc_cur.raw[p][h]);
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            acc[0][j][2 * h] = fma_acc(scale, part[j][2 * h], acc[0][j][2 * h]);
            acc[0][j][2 * h + 1] = fma_acc(scale, part[j][2 * h + 1], acc[0][j][2 * h + 1]);
          }
        }
      }
      sc_cur = sc_nxt;
      pos = next;
    }
    gemv_finish_strip<T, 1, NT>(args, red, acc, strip * 16);
  }
  cp_async_wait<0>();  // the steps issued past the block's last strip
}

template <typename T, int NT, bool kNested>
void launch(const GemvArgs& a, cudaStream_t stream, int sms) {
  // 8 ring slots: 7 steps (7 KiB a warp) in flight; two blocks per SM.
  constexpr int S = 8;
  constexpr size_t smem = sizeof(uint4) * kWarps * S * kSlot + sizeof(uint32_t) * kTableEntries +
                          sizeof(float) * 256 + gemv_reduction_bytes<1, NT>();
  opt_in_dynamic_smem<nf4_gemv_blockaligned_kernel<T, NT, S, kNested>>(smem);
  // One 16-row strip per block step: 32-row strips left the last wave of 8192->28672 60% empty.
  const int64_t strips = ceil_div<int64_t>(a.n, 16);
  const int grid = static_cast<int>(std::min<int64_t>(strips, 2LL * sms));
  nf4_gemv_blockaligned_kernel<T, NT, S, kNested><<<grid, kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int NT>
void launch_scales(const GemvArgs& a, cudaStream_t stream, int sms) {
  if (a.scales.absmax == nullptr) launch<T, NT, true>(a, stream, sms); else launch<T, NT, false>(a, stream, sms);
}

}  // namespace

void nf4_gemv_blockaligned_launch(const GemvArgs& a, at::ScalarType dtype, cudaStream_t stream, int sms) {
  if (dtype == at::kBFloat16) {
    if (a.m <= 8) launch_scales<at::BFloat16, 1>(a, stream, sms); else launch_scales<at::BFloat16, 2>(a, stream, sms);
  } else {
    if (a.m <= 8) launch_scales<at::Half, 1>(a, stream, sms); else launch_scales<at::Half, 2>(a, stream, sms);
  }
}

}  // namespace cuda
}  // namespace lora_fused
