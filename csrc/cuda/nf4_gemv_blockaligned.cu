// nf4_linear for a few rows of x (M <= 16, decode) with blocksize 64 and K % 256 == 0 (every LLM
// layer quantized as QLoRA does): out = x @ W^T + bias + lora_u @ lora_B^T, the NF4 weight streamed
// once from memory, on tensor cores.
//
// Tiling: a team of 8 warps takes strips of 16R weight rows (persistent over N) and its warps split
// K; a block is two teams with R = 1 (16 warps, 128 registers) or one with R = 2 (8 warps, 255
// registers; x's loads through L1, 4x W's bytes at 16 tokens with R = 1, halve). R = 2 from 2^25
// weights up (row_tiles). A warp step is R row tiles x 256 columns (2 KiB of W a tile); a tile's
// step is four 64-column pieces, one quantization block per row each; lane t of row group g holds
// 16 columns (8 bytes) of rows g and g+8 in each piece, at columns 64p + 16t, and the x fragments of
// a piece serve all R tiles. Each mma.m16n8k16 takes 4 columns from each of the 4 lanes of a piece
// (k-permuted: an mma sums its 16 k in any order, so lane t's logical k {2t, 2t+1, 2t+8, 2t+9} at
// mma s are physical columns 16t + 4s + {0..3} of the piece, in A and in x
// alike), so all 16 k of an mma lie in one block per row and the block scale multiplies the mma's
// fp32 result: acc += scale(row, block) * piece. Rounding: each weight enters the mma as its 16-bit
// NF4 level (dequantize-then-matmul rounds level * scale instead).
//
// Decode is bound by instruction issue as much as by memory (ncu on the H100: the previous version,
// 1 KiB steps, issued 389 instructions per KiB and ran at 50% of the copy bandwidth), so a step
// spends almost nothing beyond one shared load and one byte_perm per 2 weights:
// - The table row of byte b is 256 bytes: lane l's (level(b >> 4), level(b & 15)) pair at 4l (a
//   warp's lookups hit 32 banks), and 8 copies of the nested code code2[b] at 128 + 4g. An offset
//   b * 256 + 4l is one byte_perm of the packed word; so is a code's. One 64 KiB table serves both
//   teams.
// - W, its 8-bit block codes and their nested scales (or the fp32 scales) come through a ring of S
//   steps per warp in shared memory (cp.async, S - 1 steps ahead, across strip boundaries), chunks
//   XOR-swizzled by row so that copies and reads are free of bank conflicts; a __syncwarp orders a
//   lane's reads after the other lanes' copies. Nothing else is loaded from global memory in the
//   loop but x (L1/L2-resident).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/mma_sm80.cuh"
#include "cuda/nf4_decode.cuh"
#include "cuda/nf4_gemv.cuh"
#include "cuda/pdl.cuh"

namespace lora_fused {
namespace cuda {
namespace {

// R row tiles of 16 per warp step (a strip is 16R rows): the x fragments a step loads serve R tiles,
// so x's traffic through L1 per weight byte is 1/R (with 16 tokens, x is 4x the weight bytes at R =
// 1). R = 1: two teams of 8 warps per block, 128 registers each, 4 ring slots (3 steps in flight: 6
// KiB a warp, 96 KiB an SM); R = 2: one team (up to 255 registers: the second tile's weights, scales
// and sums), S ring slots of two tiles. One block per SM. R = 2 takes S = 2 (one step in flight a
// warp, 32 KiB an SM) by default: as fast as 3 or faster (ring_slots), and 34 KiB less shared
// memory leaves L1 more room for x, which it loads.
template <int R, int S = (R == 1 ? 4 : 2)>
struct Tiling {
  static constexpr int kTeams = R == 1 ? 2 : 1;
  static constexpr int kWarps = kTeams * kGemvWarps;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kSlots = S;
};
constexpr int kTableBytes = 256 * 256;
constexpr int kCode2Col = 128;       // byte of the code2[b] copies in table row b
constexpr int kRowBytes = 128;       // a step's bytes per weight row (256 columns)
constexpr int kStepBytes = 16 * kRowBytes;
constexpr int kStepCols = 256;
// A row tile's part of a ring slot: its weight bytes, then its scales: 16 rows x 4 code bytes and 16
// nested fp32 scales (double quantization), or 16 rows x 4 fp32 scales. A slot holds R of them.
template <bool kNested>
constexpr int tile_bytes() {
  return kStepBytes + (kNested ? 128 : 256);
}

// Byte of 16-byte chunk c (of 8) of row r (of 16) in a slot: XOR-swizzled by row, so that a warp's
// 8-byte reads (8 rows x 4 lanes, served a half-warp of 4 rows at a time) and its 16-byte copies (4
// rows x 8 chunks, a quarter-warp at a time) hit every bank once (scripts/check_ring_swizzle.py).
// Keyed by r & 7 instead, rows 2i and 2i + 1 read the same 8 banks: 2 wavefronts a half-warp, not 1
// (the H100, 8192 -> 28672 at 1 / 4 / 16 tokens: 54.6 / 58.1 / 76.6 us against 52.6 / 56.2 / 75.3).
// The key repeats every 8 rows, as the copies' offsets assume.
__device__ __forceinline__ uint32_t chunk_offset(int r, int c) { return kRowBytes * r + 16 * (c ^ (2 * (r & 3))); }

// base + b * 256 + lo for byte b = byte i of w, as one byte_perm of w and base | lo (base: the
// table's shared address, a multiple of 64 KiB; lo < 256).
__device__ __forceinline__ uint32_t table_address(uint32_t w, uint32_t base_lo, int i) {
  return __byte_perm(w, base_lo, 0x7604u | (static_cast<uint32_t>(i) << 4));
}

// Shared memory for the LoRA term when it is staged (a.lora_smem): u [m][r] fp32, lora_buffers(a)
// buffers per team of a strip's lora_B rows [16R][lora_b_stride(r)] (the next strip's land while this one's are used:
// under a saturated memory system a copy takes about as long as a strip's steps), and an mbarrier (8
// bytes) per buffer. Two buffers, or four with a.defer_sums: strip n's rows are read by strip n + 1's
// sums there, and strip n + 1's copy may then start while a slow warp still makes strip n - 2's sums.
__host__ __device__ inline int lora_buffers(const GemvArgs& a) { return a.defer_sums ? 4 : 2; }
template <int R>
__host__ __device__ inline uint32_t lora_smem_bytes(const GemvArgs& a) {
  return a.lora_smem ? static_cast<uint32_t>(4 * a.m * a.r + Tiling<R>::kTeams * lora_buffers(a) * (16 * R * 2 * lora_b_stride(a.r) + 8))
                     : 0u;
}

// A team's reduction space: 32 bytes for the deferred sums' full and empty mbarriers (8 bytes each),
// then one buffer [kGemvWarps][16 R][8 NT + 1] floats, or two with a.defer_sums. The mbarrier bytes
// are kept without a.defer_sums too: the compiler issues their inits under a false predicate there,
// and racecheck counts such a write to bytes another region uses as a race.
template <int R, int NT>
__host__ __device__ inline uint32_t red_bytes(const GemvArgs& a) {
  return 32 + (a.defer_sums ? 2 : 1) * gemv_reduction_bytes<R, NT>();
}

// Where things are in dynamic shared memory (byte offsets) when it starts at shared address `base`:
// the table at the first 64 KiB-aligned address (so that table_address needs no add), `before`
// warps' rings before it and the others after it, and the teams' reductions and the LoRA staging
// each in the gap left before the table where it fits, else after the rings. `before` is the count
// that ends the layout soonest (fewer rings before the table can leave the reductions room there).
// The end matters: the H100 gives L1 what shared memory leaves of 256 KiB in steps (196 or 228 KiB
// of shared memory), and at 16 tokens x comes through L1 (nf4_linear with R = 2 and double
// quantization needs 195 + 1 KiB; the LoRA staging after the rings, 3 more, cost L1 half its 60 KiB
// and qlora_linear 10 us of 87 at 8192 -> 28672; without double quantization 4 rings before the
// table left the reductions after the rings, 198 KiB without LoRA).
struct SmemLayout {
  uint32_t table, before, after, ring_bytes, red, lora, end;
  __host__ __device__ SmemLayout(uint32_t base, int teams, uint32_t ring_bytes_, uint32_t red_bytes, uint32_t lora_bytes)
      : ring_bytes(ring_bytes_) {
    const uint32_t warps = teams * kGemvWarps;
    table = (0u - base) & 0xffffu;
    after = table + kTableBytes;
    const uint32_t most = table / ring_bytes < warps ? table / ring_bytes : warps;
    place(warps, most, teams * red_bytes, lora_bytes);
    for (uint32_t b = 0; b < most; ++b) {
      const SmemLayout best = *this;
      place(warps, b, teams * red_bytes, lora_bytes);
      if (end >= best.end) *this = best;
    }
  }
  // The layout with b of the warps' rings before the table.
  __host__ __device__ void place(uint32_t warps, uint32_t b, uint32_t red_bytes, uint32_t lora_bytes) {
    before = b;
    end = after + (warps - before) * ring_bytes;
    uint32_t gap = before * ring_bytes;  // the next free byte before the table
    auto put = [&](uint32_t bytes) {
      uint32_t at;
      if (gap + bytes <= table) {
        at = gap;
        gap += bytes;
      } else {
        at = end;
        end += bytes;
      }
      return at;
    };
    red = put(red_bytes);
    lora = put(lora_bytes);
  }
  __host__ __device__ uint32_t ring(int warp) const {
    return warp < static_cast<int>(before) ? warp * ring_bytes : after + (warp - before) * ring_bytes;
  }
};

// The copies of one warp: the step at window c (columns 256c ...) of strip `strip` (16R rows), the
// warp's windows of a strip walked forwards (dir 1: tw, tw + 8, ...) or backwards (dir -1). In
// each row tile, lane l copies chunk l & 7 of rows (l >> 3) + 4i, and a scale word of row l & 15
// (lanes 0-15: the 4 block codes or, without double quantization, the 4 fp32 scales; lanes 16-31:
// the row's nested scale). Block indices are 32-bit (nf4_gemv_blockaligned_takes); 64-bit products
// only when the strip changes (every K / 2048 steps).
template <int R>
struct Producer {
  const uint8_t* w;  // chunk (lane & 7) of row (lane >> 3) of the step's first tile
  int32_t blk;       // first block of the step in row (lane & 15) of the first tile
  int64_t strip;
  int c;
  int dir;
  int rows;  // rows of the strip that exist (<= 0: past the last strip)

  __device__ __forceinline__ void start(const GemvArgs& a, int64_t s, int first_c, int d) {
    const int lane = threadIdx.x & 31;
    strip = s;
    c = first_c;
    dir = d;
    rows = static_cast<int>(std::min<int64_t>(16 * R, a.n - s * 16 * R));
    const int64_t row0 = rows > 0 ? s * 16 * R : 0;
    w = a.packed + (row0 + (lane >> 3)) * (a.k / 2) + kRowBytes * c + 16 * (lane & 7);
    blk = static_cast<int32_t>((row0 + (lane & 15)) * (a.k >> 6) + 4 * c);
  }
  // first_c: the warp's first window of a strip (forwards); its last one is worked out at the turn
  // (a register less in the loop).
  __device__ __forceinline__ void advance(const GemvArgs& a, int windows, int64_t strip_stride, int first_c) {
    c += kGemvWarps * dir;
    if (dir > 0 ? c < windows : c >= 0) {
      w += kRowBytes * kGemvWarps * dir;
      blk += 4 * kGemvWarps * dir;
    } else {
      const int d = a.serpentine ? -dir : 1;
      start(a, strip + strip_stride, d > 0 ? first_c : first_c + kGemvWarps * ((windows - 1 - first_c) / kGemvWarps), d);
    }
  }
};

// Per lane, where its scale copy comes from: element blk >> shift of base, elements of 2^log_size bytes.
struct ScaleSource {
  const char* base;
  int shift, log_size;
  uint32_t dst;  // byte in the slot
};

template <bool kNested>
__device__ __forceinline__ ScaleSource scale_source(const GemvArgs& a) {
  const int lane = threadIdx.x & 31, sr = lane & 15;
  if (!kNested) return {reinterpret_cast<const char*>(a.scales.absmax), 0, 2, kStepBytes + 16u * sr};
  if (lane < 16) return {reinterpret_cast<const char*>(a.scales.codes), 0, 0, kStepBytes + 4u * sr};
  return {reinterpret_cast<const char*>(a.scales.nested_absmax), a.scales.nested_shift, 2, kStepBytes + 64u + 4u * sr};
}

// Copies rows past the end as zeros (src_bytes 0: the address is not read); they are never stored.
// Tile i's rows are 16i further on: 8k bytes of W and 16 (k / 64) blocks.
template <bool kNested, int R>
__device__ __forceinline__ void issue_step(uint32_t slot, const GemvArgs& a, const Producer<R>& pr, const uint32_t (&dst)[2],
                                           const ScaleSource& ss) {
  const int lane = threadIdx.x & 31;
  if (pr.rows > 0) {
#pragma unroll
    for (int ti = 0; ti < R; ++ti) {
      const uint32_t tile = slot + ti * tile_bytes<kNested>();
      const uint8_t* w = pr.w + ti * 8 * a.k;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const bool ok = (lane >> 3) + 4 * i + 16 * ti < pr.rows;
        cp_async_16(tile + dst[i & 1] + 4 * kRowBytes * i, w + i * 2 * a.k, ok ? 16 : 0);
      }
      const bool ok = (lane & 15) + 16 * ti < pr.rows;
      const int32_t blk = pr.blk + ti * 16 * static_cast<int32_t>(a.k >> 6);
      const char* src = ss.base + (static_cast<int64_t>(blk >> ss.shift) << ss.log_size);
      if (kNested) {
        cp_async_4(tile + ss.dst, src, ok ? 4 : 0);
      } else if (lane < 16) {
        cp_async_16(tile + ss.dst, src, ok ? 16 : 0);
      }
    }
  }
  cp_async_commit();
}

// Team `team`'s copies of the lora_B rows of strip `strip` ([16R][r] at row stride lora_b_stride(r),
// rows past n as zeros) into
// b_s, then every thread's arrival on the team's mbarrier, which completes when they have landed.
template <typename T, int R>
__device__ __forceinline__ void stage_lora_rows(const GemvArgs& a, T* b_s, uint32_t mbar, int64_t strip, int tid) {
  const T* lb = static_cast<const T*>(a.lora_B);
  const int per_row = a.r / 8, stride = lora_b_stride(a.r);  // 16-byte chunks; elements
  for (int c = tid; c < 16 * R * per_row; c += kGemvThreads) {  // R passes up to r = 128
    const int64_t row = strip * 16 * R + c / per_row;
    const bool ok = row < a.n;
    const uint32_t dst = smem_u32(b_s) + 2 * ((c / per_row) * stride + 8 * (c % per_row));
    cp_async_16(dst, ok ? lb + row * a.r + 8 * (c % per_row) : lb, ok ? 16 : 0);
  }
  cp_async_arrive_on(mbar);
}

// Element idx of u: its value (lora_u given) in part[0], or its lora_splits partial sums.
template <typename T>
__device__ __forceinline__ void load_u_parts(const GemvArgs& a, int idx, float (&part)[kLoraShrinkMaxSplits]) {
  if (a.lora_parts == nullptr) {
    part[0] = static_cast<float>(static_cast<const T*>(a.lora_u)[idx]);
    return;
  }
  const int mr = a.m * a.r;
#pragma unroll
  for (int sp = 0; sp < kLoraShrinkMaxSplits; ++sp) part[sp] = sp < a.lora_splits ? a.lora_parts[sp * mr + idx] : 0.0f;
}
// The element from what load_u_parts gave: the partial sums added in split order, then scaled.
__device__ __forceinline__ float sum_u_parts(const GemvArgs& a, const float (&part)[kLoraShrinkMaxSplits]) {
  if (a.lora_parts == nullptr) return part[0];
  float v = 0.0f;
#pragma unroll
  for (int sp = 0; sp < kLoraShrinkMaxSplits; ++sp)
    if (sp < a.lora_splits) v += part[sp];
  return v * a.lora_scale;
}

// A 32-bit word of shared memory at a 32-bit shared address.
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

// a.defer_sums: the sums of the team's nth strip (at `strip`), once its partials are all in red (the
// full mbarrier of buffer nth % 2) and its lora_B rows in buffer nth % nb; then the empty mbarrier.
template <typename T, int R, int NT>
__device__ __forceinline__ void deferred_sums(const GemvArgs& a, const float* red, uint32_t mbar_red, uint32_t mbar0,
                                              const float* u_s, T* b_s0, uint32_t b_bytes, int nb, int nth, int64_t strip,
                                              int tid) {
  const int buf = nth & 1;
  const T* b_s = nullptr;
  if (a.lora_smem) {
    const int lb = nth & (nb - 1);
    mbarrier_wait_parity(mbar0 + 8 * lb, (nth / nb) & 1);
    b_s = reinterpret_cast<const T*>(reinterpret_cast<const char*>(b_s0) + lb * b_bytes);
  }
  float extra[StripOutput<R, NT>::kPer];
  gemv_strip_extras<T, R, NT>(a, strip * 16 * R, tid, a.lora_smem ? u_s : nullptr, b_s, extra);
  mbarrier_wait_parity(mbar_red + 8 * buf, (nth >> 1) & 1);
  gemv_strip_store<T, R, NT>(a, red, strip * 16 * R, tid, extra);
  mbarrier_arrive(mbar_red + 16 + 8 * buf);
}

template <typename T, int NT, int R, bool kNested, int S>
__global__ void __launch_bounds__(Tiling<R>::kThreads, 1) nf4_gemv_blockaligned_kernel(const GemvArgs args) {
  constexpr int kTeams = Tiling<R>::kTeams, kThreads = Tiling<R>::kThreads;
  constexpr int kTile = tile_bytes<kNested>(), kSlot = R * kTile;
  extern __shared__ float4 smem_raw[];
  const SmemLayout layout(smem_u32(smem_raw), kTeams, S * kSlot, red_bytes<R, NT>(args), lora_smem_bytes<R>(args));
  uint32_t smem_bytes;
  asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(smem_bytes));
  if (layout.end > smem_bytes) __trap();  // the host sized it for another base address
  char* smem = reinterpret_cast<char*>(smem_raw);
  uint32_t* table = reinterpret_cast<uint32_t*>(smem + layout.table);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int team = warp / kGemvWarps, tw = warp % kGemvWarps;
  char* ring = smem + layout.ring(warp);
  // defer_sums: reduction buffer b at red + b * kRedFloats; its full mbarrier at mbar_red + 8 b (the
  // team's partials are in), its empty one at mbar_red + 16 + 8 b (the team's sums have read them).
  const uint32_t mbar_red = smem_u32(smem + layout.red + team * red_bytes<R, NT>(args));
  float* red = reinterpret_cast<float*>(smem + layout.red + team * red_bytes<R, NT>(args) + 32);
  constexpr int kRedFloats = static_cast<int>(gemv_reduction_bytes<R, NT>() / 4);
  const uint32_t ring_s = smem_u32(ring), table_s = smem_u32(table);
  // The LoRA staging: u, this team's lora_B buffers (nb: 2, or 4 with defer_sums) and their mbarriers.
  const int nb = lora_buffers(args);
  float* u_s = reinterpret_cast<float*>(smem + layout.lora);
  const uint32_t b_bytes = 32 * R * lora_b_stride(args.r), b_off = layout.lora + 4 * args.m * args.r + team * nb * b_bytes;
  auto b_s = [&](int buf) { return reinterpret_cast<T*>(smem + b_off + buf * b_bytes); };  // arithmetic: no local array
  const uint32_t mbar0 = smem_u32(smem + layout.lora + 4 * args.m * args.r + kTeams * nb * b_bytes + 8 * nb * team);
  if (threadIdx.x % kGemvThreads == 0) {
    if (args.lora_smem)
      for (int b = 0; b < nb; ++b) mbarrier_init(mbar0 + 8 * b, kGemvThreads);
    if (args.defer_sums)
      for (int b = 0; b < 4; ++b) mbarrier_init(mbar_red + 8 * b, kGemvThreads);
  }

  const int64_t strips = ceil_div<int64_t>(args.n, 16 * R), strip_stride = int64_t{kTeams} * gridDim.x;
  const int64_t first_strip = int64_t{kTeams} * blockIdx.x + team;
  const int windows = static_cast<int>(args.k / kStepCols);
  // A warp's steps run over windows tw, tw + 8, ... of each of its team's strips in turn (a warp
  // with none, K < 256 (tw + 1), only joins the reductions).
  const int steps = tw < windows ? (windows - 1 - tw) / kGemvWarps + 1 : 0;
  // Lane l's copy i goes to row (l >> 3) + 4i, chunk l & 7: dst[i % 2] + 4 rows * i (the swizzle of
  // rows r and r + 8 is the same).
  uint32_t dst[2];
  dst[0] = chunk_offset(lane >> 3, lane & 7);
  dst[1] = chunk_offset((lane >> 3) + 4, lane & 7) - 4 * kRowBytes;
  const int mr = args.lora_smem ? args.m * args.r : 0;
  const bool loads_u = static_cast<int>(threadIdx.x) < mr;
  // A thread's elements of u threadIdx.x + p kThreads, p < u_parts, load together (one round trip):
  // all of u up to 64 ranks of the kernel's 8 NT tokens. One by one (args.u_together off) they cost
  // a round trip each (the H100, session 36, r = 64 with 16 tokens: 0.6-1.1 us of qlora_linear's
  // 25-84, where the shrink's sums are read; nothing with u given).
  constexpr int kUParts = 8 * NT * 64 / kThreads > 1 ? 8 * NT * 64 / kThreads : 1;
  const int u_parts = args.u_together ? kUParts : 1;
  float u_part[kUParts][kLoraShrinkMaxSplits];
  const ScaleSource ss = scale_source<kNested>(args);
  Producer<R> prod;
  prod.start(args, first_strip, tw, 1);
  if (steps > 0) {
#pragma unroll 1
    for (int s = 0; s < S - 1; ++s) {
      issue_step<kNested, R>(ring_s + s * kSlot, args, prod, dst, ss);
      prod.advance(args, windows, strip_stride, tw);
    }
  }
  // u's first u_parts kThreads elements, the shrink kernel's partial sums only once that grid has
  // completed (this kernel may have started before it): only the threads that load u wait, after the ring's
  // first copies, so that the weight's stream need not wait for the shrink. (Waiting before the
  // copies, u's loads first, measured the same on the H100 in session 25: within 0.2 us.)
  if (loads_u) {
    if (args.lora_parts != nullptr) pdl_wait();
#pragma unroll
    for (int p = 0; p < kUParts; ++p) {
      const int idx = threadIdx.x + p * kThreads;
      if (p < u_parts && idx < mr) load_u_parts<T>(args, idx, u_part[p]);
    }
  }
  // The table fills while the ring does. Thread i writes column i % 64 of rows i / 64 + P it (P =
  // kThreads / 64 rows a pass): the high nibble of row b0 + P it is (P it) >> 4 (a constant once
  // unrolled), the low one b0 + (P it) % 16, one of 16 / P values.
  {
    constexpr int P = kThreads / 64;
    static_assert(kThreads % 64 == 0 && 16 % P == 0, "table rows per pass");
    const int q = threadIdx.x & 63, b0 = threadIdx.x >> 6;
    if (q < 32) {
      float lo[16 / P];
#pragma unroll
      for (int j = 0; j < 16 / P; ++j) lo[j] = nf4::level(b0 + P * j);
#pragma unroll
      for (int it = 0; it < 256 / P; ++it)  // element 2j (high nibble): the lower k, the low half
        table[(b0 + P * it) * 64 + q] = pack2<T>(nf4::level((P * it) >> 4), lo[((P * it) & 15) / P]);
    } else if (kNested && q < 40) {
#pragma unroll 4
      for (int it = 0; it < 256 / P; ++it)
        table[(b0 + P * it) * 64 + q] = __float_as_uint(__ldg(args.scales.nested_code + b0 + P * it));
    }
  }
  // u into shared memory (its elements past the first u_parts kThreads loaded only now, r > 64).
  if (loads_u) {
#pragma unroll
    for (int p = 0; p < kUParts; ++p) {
      const int idx = threadIdx.x + p * kThreads;
      if (p < u_parts && idx < mr) u_s[idx] = sum_u_parts(args, u_part[p]);
    }
  }
  for (int idx = threadIdx.x + u_parts * kThreads; idx < mr; idx += kThreads) {
    load_u_parts<T>(args, idx, u_part[0]);
    u_s[idx] = sum_u_parts(args, u_part[0]);
  }
  __syncthreads();  // the table, u, the mbarriers' initialisation

  // x: token 8j + g, this lane's 16 columns of each piece; tokens past M read token 0 (their mma
  // columns are independent of the others and never stored).
  const T* x_lane[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j)
    x_lane[j] = static_cast<const T*>(args.x) + (8 * j + g < args.m ? (8 * j + g) * args.k : 0) + kStepCols * tw + 16 * t;
  // Lane (g, t), piece p: 8 bytes of rows g and g + 8 at byte 32p + 8t = chunk 2p + t/2, half t%2.
  uint32_t rd[4];
#pragma unroll
  for (int p = 0; p < 4; ++p) rd[p] = chunk_offset(g, 2 * p + (t >> 1)) + 8 * (t & 1);
  const uint32_t lane4 = table_s | (4u * lane), code2_col = table_s | (kCode2Col + 4u * g);
  uint32_t slot = 0, prev = (S - 1) * kSlot;  // bytes: the slot read now, and the one read one step ago
  // The team's nth strip uses lora_B buffer nth % nb and that buffer's mbarrier phase nth / nb.
  const int tid = threadIdx.x % kGemvThreads;
  if (args.lora_smem && first_strip < strips) stage_lora_rows<T, R>(args, b_s(0), mbar0, first_strip, tid);
  int nth = 0;
  for (int64_t strip = first_strip; strip < strips; strip += strip_stride, ++nth) {
    // The next strip's lora_B rows, into the buffer whose rows the sums of strip nth + 1 - nb have
    // read: the last strip's epilogue (2 buffers), or (4, deferred sums) once the team's threads have
    // made strip nth - 3's sums (the empty mbarrier of its reduction buffer; its next phase, strip
    // nth - 1's, needs this thread, so the parity is unambiguous).
    if (args.lora_smem && strip + strip_stride < strips) {
      const int next = (nth + 1) & (nb - 1);
      if (args.defer_sums && nth >= 3) mbarrier_wait_parity(mbar_red + 16 + 8 * ((nth - 3) & 1), ((nth - 3) >> 1) & 1);
      stage_lora_rows<T, R>(args, b_s(next), mbar0 + 8 * next, strip + strip_stride, tid);
    }
    float acc[R][NT][4];
#pragma unroll
    for (int ti = 0; ti < R; ++ti)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[ti][j][q] = 0.0f;
    // The strip's windows in the order the producer copies them (serpentine: odd strips backwards).
    const int dir = args.serpentine && (nth & 1) ? -1 : 1;
    const T* xw[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) xw[j] = x_lane[j] + (dir > 0 ? 0 : kStepCols * kGemvWarps * (steps - 1));
#pragma unroll 1
    for (int i = 0; i < steps; ++i) {
      cp_async_wait<S - 2>();
      __syncwarp();  // the slot's chunks were copied by other lanes of the warp
      const char* sl = ring + slot;
      uint2 w[R][4][2];
#pragma unroll
      for (int ti = 0; ti < R; ++ti)
#pragma unroll
        for (int p = 0; p < 4; ++p)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            w[ti][p][h] = *reinterpret_cast<const uint2*>(sl + ti * kTile + rd[p] + 8 * kRowBytes * h);
      float scale[R][2][4];
#pragma unroll
      for (int ti = 0; ti < R; ++ti)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = g + 8 * h;
          const char* sc = sl + ti * kTile + kStepBytes;
          if (kNested) {
            const uint32_t codes = *reinterpret_cast<const uint32_t*>(sc + 4 * row);
            const float s2 = *reinterpret_cast<const float*>(sc + 64 + 4 * row);
#pragma unroll
            for (int p = 0; p < 4; ++p) {
              const float c2 = __uint_as_float(lds32(table_address(codes, code2_col, p)));
              // Rows past the end: a finite scale (the offset) on a row that is never stored.
              scale[ti][h][p] = __fadd_rn(__fmul_rn(c2, s2), args.scales.offset);
            }
          } else {
            const float4 v = *reinterpret_cast<const float4*>(sc + 16 * row);
            scale[ti][h][0] = v.x;
            scale[ti][h][1] = v.y;
            scale[ti][h][2] = v.z;
            scale[ti][h][3] = v.w;
          }
        }
      // Refill the slot read one step ago: every lane has passed this step's __syncwarp, so all
      // of them have read it.
      issue_step<kNested, R>(ring_s + prev, args, prod, dst, ss);
      prod.advance(args, windows, strip_stride, tw);
      prev = slot;
      slot = slot == (S - 1) * kSlot ? 0 : slot + kSlot;

#pragma unroll
      for (int p = 0; p < 4; ++p) {
        uint4 xq[NT][2];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint4* src = reinterpret_cast<const uint4*>(xw[j] + 64 * p);
          xq[j][0] = __ldg(src);
          xq[j][1] = __ldg(src + 1);
        }
        float part[R][NT][4];
#pragma unroll
        for (int ti = 0; ti < R; ++ti)
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) part[ti][j][q] = 0.0f;
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          // mma s: columns 4s..4s+3 of the lane's 16 = bytes 2s, 2s+1 = word s/2, bytes 2(s%2), +1.
          const int b = 2 * (s & 1);
#pragma unroll
          for (int ti = 0; ti < R; ++ti) {
            const uint32_t lo = s < 2 ? w[ti][p][0].x : w[ti][p][0].y, hi = s < 2 ? w[ti][p][1].x : w[ti][p][1].y;
            uint32_t a[4];
            a[0] = lds32(table_address(lo, lane4, b));      // row g,   columns 4s, 4s+1
            a[1] = lds32(table_address(hi, lane4, b));      // row g+8, columns 4s, 4s+1
            a[2] = lds32(table_address(lo, lane4, b + 1));  // row g,   columns 4s+2, 4s+3
            a[3] = lds32(table_address(hi, lane4, b + 1));  // row g+8, columns 4s+2, 4s+3
#pragma unroll
            for (int j = 0; j < NT; ++j) {
              const uint4& xv = xq[j][s / 2];
              mma16816<T>(part[ti][j], a, s % 2 == 0 ? xv.x : xv.z, s % 2 == 0 ? xv.y : xv.w);
            }
          }
        }
#pragma unroll
        for (int ti = 0; ti < R; ++ti)
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[ti][j][q] = fma_acc(scale[ti][q >> 1][p], part[ti][j][q], acc[ti][j][q]);
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) xw[j] += kStepCols * kGemvWarps * dir;
    }
    if (args.defer_sums) {
      // Strip nth's partials into buffer nth % 2 once strip nth - 2's sums have read it, then strip
      // nth - 1's sums: the team's warps wait for each other a strip later, not twice every strip.
      const int buf = nth & 1;
      if (nth >= 2) mbarrier_wait_parity(mbar_red + 16 + 8 * buf, ((nth - 2) >> 1) & 1);
      gemv_strip_partials<R, NT>(red + buf * kRedFloats, acc, tid);
      mbarrier_arrive(mbar_red + 8 * buf);
      if (nth >= 1) deferred_sums<T, R, NT>(args, red + (buf ^ 1) * kRedFloats, mbar_red, mbar0, u_s, b_s(0), b_bytes, nb,
                                            nth - 1, strip - strip_stride, tid);
    } else if (args.lora_smem) {
      mbarrier_wait_parity(mbar0 + 8 * (nth & 1), (nth >> 1) & 1);
      gemv_finish_strip<T, R, NT>(args, red, acc, strip * 16 * R, tid, 1 + team, u_s, b_s(nth & 1));
    } else {
      gemv_finish_strip<T, R, NT>(args, red, acc, strip * 16 * R, tid, 1 + team);
    }
  }
  if (args.defer_sums && nth >= 1)  // the team's last strip's sums
    deferred_sums<T, R, NT>(args, red + ((nth - 1) & 1) * kRedFloats, mbar_red, mbar0, u_s, b_s(0), b_bytes, nb, nth - 1,
                            first_strip + (nth - 1) * strip_stride, tid);
  cp_async_wait<0>();  // the steps issued past the team's last strip
}

// The kernel's dynamic shared memory for a; it starts after the reserved bytes (1 KiB on sm80-sm90)
// and the kernel's static shared memory (none; cudaFuncGetAttributes may count the reserved bytes
// in it, so both readings are sized for and the kernel checks its own).
template <typename T, int NT, int R, bool kNested, int S>
size_t smem_bytes(const GemvArgs& a) {
  using Tl = Tiling<R, S>;
  static const std::array<uint32_t, 2> offsets = [] {
    int reserved = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, at::cuda::current_device()));
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, nf4_gemv_blockaligned_kernel<T, NT, R, kNested, S>));
    return std::array<uint32_t, 2>{static_cast<uint32_t>(reserved), static_cast<uint32_t>(reserved + attr.sharedSizeBytes)};
  }();
  const uint32_t ring = Tl::kSlots * R * tile_bytes<kNested>(), red = red_bytes<R, NT>(a), lora = lora_smem_bytes<R>(a);
  return std::max(SmemLayout(offsets[0], Tl::kTeams, ring, red, lora).end,
                  SmemLayout(offsets[1], Tl::kTeams, ring, red, lora).end);
}

template <typename T, int NT, int R, bool kNested, int S>
void launch(const GemvArgs& a, cudaStream_t stream, int sms, bool pdl) {
  using Tl = Tiling<R, S>;
  constexpr auto kernel = nf4_gemv_blockaligned_kernel<T, NT, R, kNested, S>;
  // Opted in to the GPU's limit once, as the LoRA staging makes the size vary by call.
  opt_in_dynamic_smem<kernel>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  const int64_t strips = ceil_div<int64_t>(a.n, 16 * R);
  const int grid = static_cast<int>(std::min<int64_t>(ceil_div<int64_t>(strips, Tl::kTeams), sms));
  launch_maybe_pdl(pdl, kernel, dim3(grid), dim3(Tl::kThreads), smem_bytes<T, NT, R, kNested, S>(a), stream, a);
}

// Row tiles per warp step: 2 from 2^25 weights up, 1 below (the H100 at ee198a6, 16 -> 32 rows: 8192
// -> 28672 at 1/8/16 tokens 58.1/75.6/95.8 -> 57.3/63.9/77.6 us, 11008 -> 4096 13.4/15.8/19.3 ->
// 13.1/14.1/17.1; 4096 -> 4096, 128 strips of 32 rows for 132 SMs, 7.8/8.5/9.8 -> 8.5/8.8/10.2),
// or 2 where a.two_rows asks (nf4_gemv.cu: below 2^25 where only 32-row steps can stage the LoRA
// term). LORA_FUSED_NF4_GEMV_ROWS=16 or 32 forces 1 or 2 (tests, comparisons).
int row_tiles(const GemvArgs& a) {
  const char* force = std::getenv("LORA_FUSED_NF4_GEMV_ROWS");
  if (force != nullptr && *force != '\0') {
    const std::string v(force);
    TORCH_CHECK(v == "16" || v == "32", "LORA_FUSED_NF4_GEMV_ROWS must be 16 or 32 (weight rows per warp step), got '", v, "'");
    return v == "16" ? 1 : 2;
  }
  return a.two_rows || a.n * a.k >= (int64_t{1} << 25) ? 2 : 1;
}

// Ring slots for R = 2: 2, or LORA_FUSED_NF4_GEMV_SLOTS=3 (comparisons). Two slots were as fast as
// three or faster on the H100 (session 25, 16 / 4 / 1 tokens: 8192 -> 28672 76.4 / 59.0 / 54.9 us
// against 77.4 / 61.7 / 55.6, 11008 -> 4096 17.0 / 13.4 / 12.9 against 17.3 / 13.9 / 13.3): a
// warp's arithmetic on one step takes as long as the next step's copy, and the 34 KiB less shared
// memory leave L1 more room for x. Four (3 steps in flight) were slower: 60.3 us at 1 token.
int ring_slots() {
  const char* force = std::getenv("LORA_FUSED_NF4_GEMV_SLOTS");
  if (force == nullptr || *force == '\0') return 2;
  const std::string v(force);
  TORCH_CHECK(v == "2" || v == "3", "LORA_FUSED_NF4_GEMV_SLOTS must be 2 or 3 (ring slots with 32-row steps), got '", v, "'");
  return v[0] - '0';
}

// Calls f(NT, R, nested, S) with the compile-time configuration that serves a.
template <typename F>
auto with_config(const GemvArgs& a, F&& f) {
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I3 = std::integral_constant<int, 3>;
  using I4 = std::integral_constant<int, 4>;
  const bool nested = a.scales.absmax == nullptr, two_rows = row_tiles(a) == 2;
  const bool three_slots = ring_slots() == 3;
  auto by_nested = [&](auto nt, auto rows, auto s) {
    return nested ? f(nt, rows, std::true_type{}, s) : f(nt, rows, std::false_type{}, s);
  };
  auto by_rows = [&](auto nt) {
    if (!two_rows) return by_nested(nt, I1{}, I4{});
    return three_slots ? by_nested(nt, I2{}, I3{}) : by_nested(nt, I2{}, I2{});
  };
  return a.m <= 8 ? by_rows(I1{}) : by_rows(I2{});
}

template <typename T>
size_t smem_bytes_for(const GemvArgs& a) {
  return with_config(a, [&](auto nt, auto rows, auto nested, auto slots) {
    return smem_bytes<T, decltype(nt)::value, decltype(rows)::value, decltype(nested)::value, decltype(slots)::value>(a);
  });
}

template <typename T>
void launch_for(const GemvArgs& a, cudaStream_t stream, int sms, bool pdl) {
  with_config(a, [&](auto nt, auto rows, auto nested, auto slots) {
    launch<T, decltype(nt)::value, decltype(rows)::value, decltype(nested)::value, decltype(slots)::value>(a, stream, sms, pdl);
  });
}

}  // namespace

bool nf4_gemv_blockaligned_fits(const GemvArgs& a, at::ScalarType dtype) {
  const size_t need = dtype == at::kBFloat16 ? smem_bytes_for<at::BFloat16>(a) : smem_bytes_for<at::Half>(a);
  return need <= at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
}

namespace {
// An on/off setting of the decode kernel: `unset` when the variable is empty or unset, else 0 or 1.
bool env_switch(const char* name, bool unset, const char* what) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return unset;
  const std::string s(v);
  TORCH_CHECK(s == "0" || s == "1", name, " must be 0 or 1 (", what, "), got '", s, "'");
  return s == "1";
}
}  // namespace

// Deferred strip sums (session 27, the H100, 8192 -> 28672 at 1 / 4 / 16 tokens without LoRA: 52.6 /
// 56.2 / 75.3 us with the team's two barriers a strip, 51.4 / 54.0 / 71.2 deferred; 4096 -> 11008
// 14.8 / 15.6 / 20.5 against 14.3 / 14.6 / 19.4). LORA_FUSED_NF4_GEMV_DEFER=0 turns them off
// (tests, comparisons).
bool nf4_gemv_defer_sums() {
  return env_switch("LORA_FUSED_NF4_GEMV_DEFER", true, "whether the decode kernel defers its strip sums");
}

// Serpentine strips (on unless LORA_FUSED_NF4_GEMV_SERPENTINE=0; benchmarks/RESULTS.md, session 33:
// 72.6 against 74.5 us at 8192 -> 28672 with 16 tokens, the same elsewhere): with 16 tokens x is
// 2-4x the weight's bytes through L1 and 256 KiB at K = 8192, more than L1 holds, so each strip would
// read it from L2 again; a strip walked backwards starts on the windows of x the previous strip ended
// on. The sums' order changes with the direction (rounding only).
bool nf4_gemv_serpentine() {
  return env_switch("LORA_FUSED_NF4_GEMV_SERPENTINE", true, "whether the decode kernel's strips alternate their direction over K");
}

// u's elements loaded together before the first strip (on unless LORA_FUSED_NF4_GEMV_U_TOGETHER=0,
// which loads those past a thread's first one by one, a round trip each, as before session 36).
bool nf4_gemv_u_together() {
  return env_switch("LORA_FUSED_NF4_GEMV_U_TOGETHER", true, "whether the decode kernel loads a thread's elements of u together");
}

void nf4_gemv_blockaligned_launch(const GemvArgs& a, at::ScalarType dtype, cudaStream_t stream, int sms, bool pdl) {
  if (dtype == at::kBFloat16) {
    launch_for<at::BFloat16>(a, stream, sms, pdl);
  } else {
    launch_for<at::Half>(a, stream, sms, pdl);
  }
}

}  // namespace cuda
}  // namespace lora_fused
