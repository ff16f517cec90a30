// nf4_linear for a few rows of x (M <= 16, decode): out = x @ W^T + bias + lora_u @ lora_B^T with the
// NF4 weight W [N, K] streamed once from memory and decoded in registers, on tensor cores.
//
// Tiling: a thread block takes R strips of 16 weight rows (persistent over the strips of N); its 8
// warps split K, each with the next step's loads in flight while it computes the current one. A
// warp step is a 16-row x 128-column tile of W: the 4 lanes of each row group load 16 bytes (32
// elements) of rows g and g+8, and 8 mma.m16n8k16 per strip consume them against ceil(M/8) tiles of
// 8 tokens. The partial sums of the 8 warps meet in shared memory; the epilogue
// adds bias and the LoRA term in fp32 and rounds once.
//
// Why the k-permutation is right: an mma sums over its 16 k positions in any order, so any bijection
// between the 16 logical k of the fragment layout and 16 physical columns works if A and B use the
// same one. Lane t of a row group holds logical k {2t, 2t+1, 2t+8, 2t+9}; we map them, at step s of
// 8, to physical columns 32c + 4s + {0, 1, 2, 3} of its 32-column chunk c. A's pairs then come from
// one packed byte each, and B's pairs from x[token][32c + 4s ...], contiguous.
//
// nf4_gemv_blockaligned.cu takes blocksize 64 with K % 256 == 0 (every LLM layer quantized as
// QLoRA does; 1.15-1.6x faster than this kernel on the H100 at every M and shape measured); this
// kernel takes the rest (other blocksizes, K % 256 != 0). LORA_FUSED_NF4_GEMV=general or
// =blockaligned forces one (the latter where it applies), for tests and comparisons.
//
// Weights are decoded exactly as nf4_dequantize does (fp32 level * fp32 scale, rounded once to
// bf16/fp16), from a byte -> (level hi, level lo) table replicated per lane so that the lookups of
// a warp never conflict on shared-memory banks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdlib>
#include <string>

#include "cuda/common.cuh"
#include "cuda/mma_sm80.cuh"
#include "cuda/nf4_decode.cuh"
#include "cuda/nf4_gemv.cuh"
#include "cuda/pdl.cuh"

namespace lora_fused {
namespace {

using cuda::GemvArgs;
constexpr int kWarps = cuda::kGemvWarps;
constexpr int kThreads = cuda::kGemvThreads;
constexpr int kTableEntries = 256 * 32;  // byte x lane

// Streaming 16-byte load: the weight is read once, keep it out of L1.
__device__ __forceinline__ uint4 load_stream(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <typename T>
__device__ __forceinline__ uint32_t decode_pair(const float2* table, uint32_t byte, float s) {
  const float2 v = table[(byte << 5) + (threadIdx.x & 31)];
  return cuda::pack2<T>(v.x * s, v.y * s);  // element 2j (high nibble) first: the lower k, the low half
}

// What a warp step reads from memory for its R strips: 16 packed bytes of rows g and g+8, and the
// raw block scale (fp32 bits, or the 8-bit code and its nested fp32 scale).
template <int R>
struct Stage {
  uint4 w[R][2];
  uint32_t raw[R][2];
  float s2[R][2];
};

constexpr uint32_t kZeroNibbles = 0x77777777u;  // level 7 is 0.0: rows/chunks past the end add nothing

template <int R>
__device__ __forceinline__ void load_stage(Stage<R>& st, const GemvArgs& a, int64_t nbase, int64_t c, bool valid) {
  const int g = (threadIdx.x & 31) >> 2;
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = nbase + 16 * i + 8 * h + g;
      const bool ok = valid && row < a.n;
      const int64_t f = row * a.k + 32 * c;
      const int64_t blk = f >> a.bs_shift;
      st.w[i][h] = ok ? load_stream(a.packed + f / 2) : make_uint4(kZeroNibbles, kZeroNibbles, kZeroNibbles, kZeroNibbles);
      if (a.scales.absmax != nullptr) {
        st.raw[i][h] = ok ? __float_as_uint(__ldg(a.scales.absmax + blk)) : 0u;
        st.s2[i][h] = 0.0f;
      } else {
        st.raw[i][h] = ok ? a.scales.codes[blk] : 0u;
        const int64_t b2 = a.scales.nested_shift >= 0 ? blk >> a.scales.nested_shift : blk / a.scales.nested_blocksize;
        st.s2[i][h] = ok ? __ldg(a.scales.nested_absmax + b2) : 0.0f;
      }
    }
}

template <typename T, int R, int NT>
__global__ void __launch_bounds__(kThreads, 2) nf4_gemv_kernel(const GemvArgs args) {
  extern __shared__ float4 smem_raw[];
  float2* table = reinterpret_cast<float2*>(smem_raw);
  float* code2 = reinterpret_cast<float*>(table + kTableEntries);  // the 256-entry nested code
  constexpr int kRows = 16 * R;
  float* red = code2 + 256;  // the strip's reduction (gemv_finish_strip)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  for (int i = threadIdx.x; i < kTableEntries; i += kThreads) {
    const int b = i >> 5;
    table[i] = make_float2(nf4::level(b >> 4), nf4::level(b & 15));
  }
  const bool nested = args.scales.absmax == nullptr;
  if (nested) code2[threadIdx.x] = args.scales.nested_code[threadIdx.x];
  __syncthreads();
  const T* x = static_cast<const T*>(args.x);
  const int64_t n = args.n, k = args.k, chunks = k / 32;
  const int64_t strips = cuda::ceil_div<int64_t>(n, kRows);
  for (int64_t strip = blockIdx.x; strip < strips; strip += gridDim.x) {
    const int64_t nbase = strip * kRows;
    float acc[R][NT][4];
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;
    // Warp-uniform loop (mma.sync needs the whole warp); lanes past the last chunk read zero nibbles.
    // The next step's weight bytes and scales are in flight while this step computes.
    Stage<R> cur, nxt;
    load_stage(cur, args, nbase, 4 * warp + t, 4 * warp + t < chunks);
    for (int64_t c0 = 4 * warp; c0 < chunks; c0 += 4 * kWarps) {
      const int64_t c = c0 + t;
      const bool valid = c < chunks;
      uint4 xq[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int tok = 8 * j + g;
        const bool ok = valid && tok < args.m;
        const uint4* src = reinterpret_cast<const uint4*>(x + tok * k + 32 * c);
#pragma unroll
        for (int q = 0; q < 4; ++q) xq[j][q] = ok ? __ldg(src + q) : make_uint4(0, 0, 0, 0);
      }
      const int64_t cn = c0 + 4 * kWarps + t;
      if (c0 + 4 * kWarps < chunks) load_stage(nxt, args, nbase, cn, cn < chunks);
      float sc[R][2];
#pragma unroll
      for (int i = 0; i < R; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          sc[i][h] = nested ? __fadd_rn(__fmul_rn(code2[cur.raw[i][h]], cur.s2[i][h]), args.scales.offset)
                            : __uint_as_float(cur.raw[i][h]);
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
          const uint32_t lo = word_of(cur.w[i][0], s / 2) >> shift, hi = word_of(cur.w[i][1], s / 2) >> shift;
          uint32_t a[4];
          a[0] = decode_pair<T>(table, lo & 0xffu, sc[i][0]);         // row g,   columns 4s, 4s+1
          a[1] = decode_pair<T>(table, hi & 0xffu, sc[i][1]);         // row g+8, columns 4s, 4s+1
          a[2] = decode_pair<T>(table, (lo >> 8) & 0xffu, sc[i][0]);  // row g,   columns 4s+2, 4s+3
          a[3] = decode_pair<T>(table, (hi >> 8) & 0xffu, sc[i][1]);  // row g+8, columns 4s+2, 4s+3
#pragma unroll
          for (int j = 0; j < NT; ++j) cuda::mma16816<T>(acc[i][j], a, b0[j], b1[j]);
        }
      }
      cur = nxt;
    }
    cuda::gemv_finish_strip<T, R, NT>(args, red, acc, nbase, threadIdx.x, 0);
  }
}

template <typename T, int R, int NT>
void launch(const GemvArgs& a, cudaStream_t stream, int sms) {
  constexpr size_t smem = sizeof(float2) * kTableEntries + sizeof(float) * 256 + cuda::gemv_reduction_bytes<R, NT>();
  cuda::opt_in_dynamic_smem<nf4_gemv_kernel<T, R, NT>>(smem);
  const int64_t strips = cuda::ceil_div<int64_t>(a.n, 16 * R);
  const int grid = static_cast<int>(std::min<int64_t>(strips, 2LL * sms));
  nf4_gemv_kernel<T, R, NT><<<grid, kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int NT>
void launch_rows(const GemvArgs& a, cudaStream_t stream, int sms) {
  // Enough strips for two resident blocks per SM, and as many rows per block as that allows (more
  // rows per block = more 16-byte loads in flight per warp; R = 4 with the prefetch stage would
  // exceed 128 registers).
  if (a.n >= 32LL * 2 * sms) {
    launch<T, 2, NT>(a, stream, sms);
  } else {
    launch<T, 1, NT>(a, stream, sms);
  }
}

}  // namespace

bool nf4_gemv_cuda(const at::Tensor& x_in, const Nf4Weight& w, const c10::optional<at::Tensor>& bias,
                   const c10::optional<at::Tensor>& lora_u, const c10::optional<at::Tensor>& lora_B,
                   const c10::optional<at::Tensor>& lora_A, double lora_scale, at::Tensor& out) {
  const int64_t m = x_in.size(0), k = w.in_features;
  const at::ScalarType t = x_in.scalar_type();
  if (m < 1 || m > 16 || k % 32 != 0 || (t != at::kBFloat16 && t != at::kHalf)) return false;
  if (reinterpret_cast<uintptr_t>(w.packed.data_ptr()) % 16 != 0) return false;
  const auto props = at::cuda::getCurrentDeviceProperties();
  if (props->major < 8) return false;
  const int bs_shift = cuda::log2_exact(w.blocksize);
  if (bs_shift < 5) return false;  // a 32-element chunk must sit in one quantization block
  at::Tensor x = x_in.contiguous();
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) x = x.clone();
  at::Tensor u, b, a_lora, parts;
  GemvArgs a{};
  a.x = x.data_ptr();
  a.packed = w.packed.data_ptr<uint8_t>();
  a.scales = cuda::make_block_scales(w);
  a.bs_shift = bs_shift;
  a.m = static_cast<int>(m);
  a.n = w.out_features;
  a.k = k;
  c10::optional<at::Tensor> bias_c = bias.has_value() ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  a.bias = bias_c.has_value() ? bias_c->data_ptr() : nullptr;
  out = at::empty({m, w.out_features}, x.options());
  a.out = out.data_ptr();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = props->multiProcessorCount;
  const char* force = std::getenv("LORA_FUSED_NF4_GEMV");
  const bool aligned = (force == nullptr || std::string(force) != "general") && cuda::nf4_gemv_blockaligned_takes(a);
  const bool lora = lora_A.has_value() || lora_u.has_value();
  if (lora) {
    b = lora_B->contiguous();
    if (aligned && reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 != 0) b = b.clone();  // staged in 16-byte copies
    a.lora_B = b.data_ptr();
    a.r = static_cast<int>(b.size(1));
    if (aligned && a.r % 8 == 0) {
      GemvArgs staged = a;
      staged.lora_smem = true;
      a.lora_smem = cuda::nf4_gemv_blockaligned_fits(staged, t);
      // 16-row steps (weights under 2^25 elements) have no room for the staging at r = 32 with 10-16
      // tokens, r = 64 with 9-16 or r >= 128 (scripts/nf4_decode_smem_layout.py); 32-row steps do, and the
      // term then costs less than read from global memory (the H100, session 36: 4096->4096, r = 64,
      // 16 tokens 19.1 -> 14.4 us; NF4 alone 10.5 and 10.6 us with 16- and 32-row steps).
      staged.two_rows = true;
      if (!a.lora_smem && cuda::nf4_gemv_blockaligned_fits(staged, t)) a.lora_smem = a.two_rows = true;
    }
  }
  bool pdl = false;
  if (lora_A.has_value() && a.lora_smem) {
    // u = lora_scale * x @ lora_A^T: partial sums from a small kernel that the decode kernel may
    // overlap (sm_90), added and scaled by the decode kernel.
    a_lora = lora_A->contiguous();
    if (reinterpret_cast<uintptr_t>(a_lora.data_ptr()) % 16 != 0) a_lora = a_lora.clone();
    a.lora_splits = cuda::lora_shrink_splits(k);
    parts = at::empty({a.lora_splits, m, a.r}, x.options().dtype(at::kFloat));
    cuda::lora_shrink_partials_launch(x.data_ptr(), k, a_lora.data_ptr(), parts.data_ptr<float>(), a.m, a.r, k, t, stream);
    a.lora_parts = parts.data_ptr<float>();
    a.lora_scale = static_cast<float>(lora_scale);
    pdl = cuda::pdl_enabled(props->major);
  } else if (lora) {
    u = lora_A.has_value() ? nf4_lora_u(x, *lora_A, lora_scale) : lora_u->contiguous();
    a.lora_u = u.data_ptr();
  }
  if (aligned) {
    if (cuda::nf4_gemv_defer_sums()) {
      // Where the second reduction buffer (and with the LoRA staging, two more lora_B buffers) fits
      // (on the H100 not at 9-16 tokens with 16-row steps): else the team's barriers.
      GemvArgs deferred = a;
      deferred.defer_sums = true;
      a.defer_sums = cuda::nf4_gemv_blockaligned_fits(deferred, t);
    }
    a.serpentine = cuda::nf4_gemv_serpentine();
    a.u_together = cuda::nf4_gemv_u_together();
    cuda::nf4_gemv_blockaligned_launch(a, t, stream, sms, pdl);
    return true;
  }
  if (t == at::kBFloat16) {
    if (m <= 8) launch_rows<at::BFloat16, 1>(a, stream, sms); else launch_rows<at::BFloat16, 2>(a, stream, sms);
  } else {
    if (m <= 8) launch_rows<at::Half, 1>(a, stream, sms); else launch_rows<at::Half, 2>(a, stream, sms);
  }
  return true;
}

}  // namespace lora_fused
