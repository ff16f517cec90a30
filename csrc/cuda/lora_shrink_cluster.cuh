// The LoRA shrink inside the block-aligned NF4 decode kernel (GemvArgs::shrink_here,
// LORA_FUSED_NF4_GEMV_CLUSTER): u = lora_scale x @ lora_A^T made by every cluster of C blocks, each
// block over its 1/C of K, the blocks' partial products exchanged through distributed shared memory
// (sm_90) and added in cluster-rank order, so that u is the same in every block and every run. It
// replaces the separate shrink kernel, whose completion the decode kernel otherwise waits for before
// its first strip (1.3-2.0 us of qlora_linear's 10-22 us at 4096-wide layers on the H100, session 36).
// Each cluster reads all of lora_A once from L2: C = 1 (no cluster launch, every block makes all of u)
// reads it once a block.
//
// A block's share of the work: T = r / 8 rank tiles x the slice's 32-column chunks, dealt to its kW
// warps as work lanes (tile, group), G = max(1, kW / T) groups taking every G-th chunk; a chunk is two
// mma.m16n8k16 (x as the A operand, tokens past m reading token 0 and never stored), as in
// lora_shrink_partials.cu. A warp's loads of a batch of chunks (2 or 4) are in flight at once; the kernel issues
// its first batch before the weight ring's copies (a load issued behind them waits microseconds).
#pragma once
#include <cstdint>

#include "cuda/mma_sm80.cuh"
#include "cuda/nf4_gemv.cuh"

namespace lora_fused {
namespace cuda {

// Cluster rank and size, barrier halves and a read of another block's shared memory. Compiled for an
// older target (no clusters) a block is a cluster of one.
__device__ __forceinline__ uint32_t cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t v;
  asm("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(v));
  return v;
#else
  return 0;
#endif
}
__device__ __forceinline__ uint32_t cluster_size() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t v;
  asm("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(v));
  return v;
#else
  return 1;
#endif
}
// Every thread of every block of the cluster arrives once a phase (release: its earlier shared-memory
// accesses are seen by whoever waits); wait (acquire) returns once all have arrived.
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait;\n" ::: "memory");
#else
  __syncthreads();
#endif
}
// The float at shared address `addr` (of this block's layout) in the block of cluster rank `rank`.
__device__ __forceinline__ float load_cluster_f32(uint32_t addr, uint32_t rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t remote;
  float v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(addr), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(remote) : "memory");
  return v;
#else
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
  return v;
#endif
}

// Groups of chunks a rank tile's work is dealt in (kW warps, r / 8 tiles).
__host__ __device__ constexpr int shrink_groups(int warps, int r) { return warps / (r / 8) > 1 ? warps / (r / 8) : 1; }
// Bytes of the warps' sums before they are added over the groups: [groups][m][r] floats (the kernel
// keeps them in its first team's reduction buffer, unused until the first strip ends).
__host__ __device__ constexpr uint32_t shrink_scratch_bytes(int warps, int m, int r) {
  return 4u * shrink_groups(warps, r) * m * r;
}

// One warp's walk over its work lanes wl = warp, warp + kW, ... < G T and, in each, its chunks in
// batches of kBatch: where the batch's loads go, and the sums of the current work lane.
template <typename T, int kW, int kBatch>
struct ClusterShrink {
  int tiles, groups, lanes;  // T, G, G T
  int c0, c1;                // the block's chunks [c0, c1) of K / 32
  int wl, i0;                // the current work lane and its batch's first chunk (of the lane's)
  uint4 xa[kBatch], xb[kBatch], av[kBatch];
  float c[4];

  // Where the warp starts (a.r % 8 == 0, a.r > 0).
  __device__ __forceinline__ void init(const GemvArgs& a) {
    tiles = a.r / 8;
    groups = shrink_groups(kW, a.r);
    lanes = groups * tiles;
    const int chunks = static_cast<int>(a.k / 32), size = static_cast<int>(cluster_size());
    const int per = (chunks + size - 1) / size;
    c0 = min(chunks, static_cast<int>(cluster_rank()) * per);
    c1 = min(chunks, c0 + per);
    wl = threadIdx.x >> 5;
    i0 = 0;
    c[0] = c[1] = c[2] = c[3] = 0.0f;
  }
  __device__ __forceinline__ bool active() const { return wl < lanes; }
  // Chunk i (of the current work lane's) and whether it is in the block's slice.
  __device__ __forceinline__ int chunk(int i) const { return c0 + wl / tiles + groups * i; }

  // The batch's loads (chunks past the slice read the slice's first chunk and multiply by zero).
  __device__ __forceinline__ void load(const GemvArgs& a) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, m = a.m;
    const int64_t k = a.k;
    const T* x0 = static_cast<const T*>(a.x) + (g < m ? g : 0) * k + 8 * t;
    const T* x8 = static_cast<const T*>(a.x) + (g + 8 < m ? g + 8 : 0) * k + 8 * t;
    const T* ar = static_cast<const T*>(a.lora_A) + (8 * (wl % tiles) + g) * k + 8 * t;
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int ch = chunk(i0 + i), col = 32 * (ch < c1 ? ch : c0);
      xa[i] = load_nc16(x0 + col);
      xb[i] = load_nc16(x8 + col);
      av[i] = load_nc16(ar + col);
    }
  }

  // The batch's mmas; at the work lane's end its sums go to scratch [G][m][r] and the next lane's
  // first batch is loaded. Returns whether work remains.
  __device__ __forceinline__ bool step(const GemvArgs& a, float* scratch) {
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const bool ok = chunk(i0 + i) < c1;
      // Lane t's logical k {2t, 2t+1, 2t+8, 2t+9} are physical columns 8t + {0..3} in the first mma
      // and 8t + {4..7} in the second (x and lora_A use the same map).
      const uint32_t a0[4] = {xa[i].x, xb[i].x, xa[i].y, xb[i].y}, a1[4] = {xa[i].z, xb[i].z, xa[i].w, xb[i].w};
      mma16816<T>(c, a0, ok ? av[i].x : 0u, ok ? av[i].y : 0u);
      mma16816<T>(c, a1, ok ? av[i].z : 0u, ok ? av[i].w : 0u);
    }
    i0 += kBatch;
    if (chunk(i0) >= c1) {
      // c: tokens g (c[0], c[1]) and g + 8 (c[2], c[3]), ranks 8 tile + 2t + {0, 1}.
      const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
      const int j = 8 * (wl % tiles) + 2 * t;
      float* s = scratch + (wl / tiles) * a.m * a.r;
      if (g < a.m) {
        s[g * a.r + j] = c[0];
        s[g * a.r + j + 1] = c[1];
      }
      if (g + 8 < a.m) {
        s[(g + 8) * a.r + j] = c[2];
        s[(g + 8) * a.r + j + 1] = c[3];
      }
      c[0] = c[1] = c[2] = c[3] = 0.0f;
      wl += kW;
      i0 = 0;
    }
    if (!active()) return false;
    load(a);
    return true;
  }
};

// After every warp's sums are in scratch and a barrier of the block: the block's partial product
// [m][r] into part_s, then (a cluster barrier) u_s [m][r] = lora_scale times the cluster's partial
// products added in rank order, then this thread's arrival for the barrier that cluster_wait()
// completes before the kernel exits (its blocks' part_s must outlive the others' reads).
template <int kThreads, int kW>
__device__ __forceinline__ void cluster_shrink_finish(const GemvArgs& a, const float* scratch, float* part_s, float* u_s) {
  const int mr = a.m * a.r, groups = shrink_groups(kW, a.r);
  for (int idx = threadIdx.x; idx < mr; idx += kThreads) {
    float v = 0.0f;
    for (int gr = 0; gr < groups; ++gr) v += scratch[gr * mr + idx];
    part_s[idx] = v;
  }
  cluster_arrive();
  cluster_wait();
  const uint32_t size = cluster_size(), base = static_cast<uint32_t>(__cvta_generic_to_shared(part_s));
  for (int idx = threadIdx.x; idx < mr; idx += kThreads) {
    float v = 0.0f;
    for (uint32_t rk = 0; rk < size; ++rk) v += load_cluster_f32(base + 4u * idx, rk);
    u_s[idx] = v * a.lora_scale;
  }
  cluster_arrive();
}

}  // namespace cuda
}  // namespace lora_fused
