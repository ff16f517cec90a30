// lora_decode on CUDA: out[M, d] = x @ W^T + scale * (x @ A^T) @ B^T + bias, for decode batches
// (M <= 16), where the layer is a matrix-vector product bound by streaming W once.
// u = x @ A^T comes as partial sums over slices of K from lora_shrink_partials (k % 32 == 0; the
// kernel here may start while it runs, programmatic dependent launch, and adds them once it has
// waited for it), else from one small cuBLAS GEMM. From 2 tokens on (and for one where K <= 4096 or
// the weight is larger than L2, streamed with no-allocate hints) the tensor-core kernel of
// lora_decode_mma.cu streams W (or, asked for, the bulk-copy kernel of lora_decode_bulk.cu on
// sm_90); else the kernel here, with 16-byte loads: a warp
// owns kRowsPerWarp output features and walks their rows with SEG 16-byte loads per row in flight,
// the block's x is staged in shared memory SEG * 256 columns at a time, and scale * u sits in shared
// memory so the LoRA term joins the same fp32 accumulators before one warp reduction and a single
// rounding. Other shapes (M > 16, fp32, k % 8 != 0, misaligned) take the composed path (cuBLAS
// GEMMs), which is equally correct.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "checks.h"
#include "cuda/common.cuh"
#include "cuda/lora_decode_bulk.h"
#include "cuda/lora_decode_mma.h"
#include "cuda/lora_shrink_partials.h"
#include "cuda/pdl.cuh"
#include "cuda/stream_load.cuh"
#include "cuda/unpack16.cuh"
#include "lora_linear_composed.h"

namespace lora_fused {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxRank = 256;  // scale * u in shared memory: 16 x 256 x 4 B = 16 KB
constexpr int kRowsPerWarp = 2;  // 1 (8 rows a block, one token) ran within 1% (session 30)
// 16-byte loads in flight per row and lane: 4 where the staged x (MT rows x SEG * 256 columns) leaves
// room for u in 48 KiB of static shared memory.
template <int MT>
constexpr int segments() {
  return MT <= 8 ? 4 : 2;
}
constexpr int kMaxM = 16;

using cuda::unpack2;


// acc += dot(w[0:8], x[0:8]) for 8 packed 16-bit values each.
template <typename T>
__device__ __forceinline__ float dot8(const uint4& w, const uint4& x, float acc) {
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(&w);
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(&x);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = unpack2(wp[i], T()), b = unpack2(xp[i], T());
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
  return acc;
}

// u: [M, R] with row stride ldu, or (u == nullptr) splits partial sums parts [splits][M][R].
template <typename T, int MT, bool kStream>
__global__ void __launch_bounds__(kThreads, 2)
    lora_decode_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ w, int64_t ldw,
                       const T* __restrict__ u, int64_t ldu, const float* __restrict__ parts, int splits,
                       const T* __restrict__ b, int64_t b_sd, int64_t b_sr, const T* __restrict__ bias,
                       T* __restrict__ out, int M, int64_t K, int64_t D, int R, float scale) {
  constexpr int SEG = segments<MT>(), kChunk = SEG * 256, kRowsPerBlock = kWarps * kRowsPerWarp;
  __shared__ alignas(16) T xs[MT][kChunk];
  __shared__ float us[MT][kMaxRank];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp * kRowsPerWarp;

  float acc[kRowsPerWarp][MT];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[rr][m] = 0.0f;

  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int kc = static_cast<int>(K - k0 < kChunk ? K - k0 : kChunk);  // a multiple of 8
    __syncthreads();  // the previous chunk is consumed
    for (int i = threadIdx.x; i < MT * (kc / 8); i += kThreads) {
      const int m = i / (kc / 8), c = (i % (kc / 8)) * 8;
      *reinterpret_cast<uint4*>(&xs[m][c]) =
          m < M ? *reinterpret_cast<const uint4*>(x + m * ldx + k0 + c) : zero;
    }
    __syncthreads();
    // SEG 16-byte segments per row per step, so each lane keeps SEG x kRowsPerWarp loads in flight.
    for (int c = lane * 8; c < kc; c += SEG * 32 * 8) {
      // Every load first, unconditional (rows past D and columns past the chunk read row D - 1 /
      // column c and are zeroed after), so that they are all in flight at once.
      uint4 wv[SEG][kRowsPerWarp];
#pragma unroll
      for (int sg = 0; sg < SEG; ++sg)
#pragma unroll
        for (int rr = 0; rr < kRowsPerWarp; ++rr) {
          const int64_t n = n0 + rr < D ? n0 + rr : D - 1;
          const int cs = c + sg * 32 * 8 < kc ? c + sg * 32 * 8 : c;
          wv[sg][rr] = cuda::load_nc16_hinted<kStream>(w + n * ldw + k0 + cs);
        }
#pragma unroll
      for (int sg = 0; sg < SEG; ++sg)
#pragma unroll
        for (int rr = 0; rr < kRowsPerWarp; ++rr)
          if (n0 + rr >= D || c + sg * 32 * 8 >= kc) wv[sg][rr] = zero;
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int sg = 0; sg < SEG; ++sg) {
          const int cs = c + sg * 32 * 8;
          const uint4 xv = cs < kc ? *reinterpret_cast<const uint4*>(&xs[m][cs]) : zero;
#pragma unroll
          for (int rr = 0; rr < kRowsPerWarp; ++rr) acc[rr][m] = dot8<T>(wv[sg][rr], xv, acc[rr][m]);
        }
    }
  }

  // u only now: the shrink kernel (programmatic dependent launch) ran beside the weight stream.
  if (u == nullptr) cuda::pdl_wait();  // the shrink kernel's partial sums
  for (int i = threadIdx.x; i < MT * R; i += kThreads) {
    const int m = i / R, j = i % R;
    float v = 0.0f;
    if (m < M && u != nullptr) {
      v = static_cast<float>(u[m * ldu + j]);
    } else if (m < M) {
      v = cuda::lora_shrink_sum(parts, splits, M, R, m, j);
    }
    us[m][j] = v * scale;
  }
  __syncthreads();
  // The LoRA term: lanes split the rank, into the same accumulators.
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t n = n0 + rr;
    if (n >= D) continue;
    for (int j = lane; j < R; j += 32) {
      const float bv = static_cast<float>(b[n * b_sd + j * b_sr]);
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[rr][m] = fmaf(us[m][j], bv, acc[rr][m]);
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t n = n0 + rr;
    const float bn = bias != nullptr && n < D ? static_cast<float>(bias[n]) : 0.0f;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float v = cuda::warp_sum(acc[rr][m]);  // every lane holds the sum
      if (lane == m && m < M && n < D) out[m * D + n] = static_cast<T>(v + bn);
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

enum class DecodeKernel { kSimt, kMma, kBulk };

// The tensor-core kernel from 2 tokens on, and for one token where K <= 4096 (H200: 9.0 against 10.7
// us at 4096->4096, 28.0 against 30.6 at 4096->11008; from K = 8192 the CUDA-core kernel streamed W
// faster: 36.2 against 40.5 us at 8192->8192) or where the weight's loads take streaming hints (H100:
// 48.1 against the CUDA-core kernel's 49.4 with them, 50.4 without, at 8192->8192). LORA_FUSED_DECODE_KERNEL=simt|mma|bulk picks one; the
// bulk-copy kernel (lora_decode_bulk.cu, sm_90) is not the default: it lost to these two at 4096->4096
// and at 16 tokens, and to the CUDA-core kernel at one token on the H200 (RESULTS.md, session 29).
DecodeKernel pick_kernel(int64_t m, int64_t k, int major, bool hints) {
  const char* env = std::getenv("LORA_FUSED_DECODE_KERNEL");
  if (env != nullptr && *env != '\0') {
    if (std::strcmp(env, "simt") == 0) return DecodeKernel::kSimt;
    if (std::strcmp(env, "mma") == 0) return major >= 8 ? DecodeKernel::kMma : DecodeKernel::kSimt;
    TORCH_CHECK(std::strcmp(env, "bulk") == 0, "lora_fused.lora_decode: LORA_FUSED_DECODE_KERNEL must be simt, mma or bulk; got '",
                env, "'");
    TORCH_CHECK(cuda::lora_decode_bulk_available(), "lora_fused.lora_decode: LORA_FUSED_DECODE_KERNEL=bulk needs an sm_90 GPU "
                "and a build with sm_90 code (TORCH_CUDA_ARCH_LIST with 9.0a); this GPU is sm_", major, "x");
    return DecodeKernel::kBulk;
  }
  if (major >= 8 && (m >= 2 || k <= 4096 || hints)) return DecodeKernel::kMma;
  return DecodeKernel::kSimt;
}

// The LoRA input: u [M, r] (T), or the shrink kernel's partial sums (fp32 [splits][M][r]).
struct ShrinkOut {
  at::Tensor u, parts;
  int splits = 0;
  bool pdl = false;
};

template <typename T, int MT, bool kStream = false>
void launch(const at::Tensor& x, const at::Tensor& w, const ShrinkOut& sh, const at::Tensor& b,
            const c10::optional<at::Tensor>& bias, at::Tensor& out, double scale, int64_t r) {
  const int64_t D = w.size(0);
  const unsigned int grid = cuda::grid_x(cuda::ceil_div<int64_t>(D, kWarps * kRowsPerWarp), "lora_fused.lora_decode");
  const bool has_u = sh.u.defined();
  cuda::launch_maybe_pdl(sh.pdl, lora_decode_kernel<T, MT, kStream>, dim3(grid), dim3(kThreads), 0,
                         at::cuda::getCurrentCUDAStream(), x.data_ptr<T>(), x.stride(0), w.data_ptr<T>(), w.stride(0),
                         has_u ? sh.u.data_ptr<T>() : static_cast<T*>(nullptr), has_u ? sh.u.stride(0) : int64_t{0},
                         has_u ? static_cast<float*>(nullptr) : sh.parts.data_ptr<float>(), sh.splits,
                         b.data_ptr<T>(), b.stride(0), b.stride(1), bias.has_value() ? bias->data_ptr<T>() : nullptr,
                         out.data_ptr<T>(), static_cast<int>(x.size(0)), x.size(1), D, static_cast<int>(r),
                         static_cast<float>(scale));
}

at::Tensor lora_decode_cuda(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, double scale, const c10::optional<at::Tensor>& bias) {
  check_lora_linear_args(x_in, weight, lora_a, lora_b, bias, "lora_fused.lora_decode");
  check_device(x_in, at::kCUDA, "lora_fused.lora_decode", "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), R = lora_a.size(0);
  const auto dt = x.scalar_type();
  const bool fast = M >= 1 && M <= kMaxM && R <= kMaxRank && (dt == at::kBFloat16 || dt == at::kHalf) &&
                    K % 8 == 0 && x.stride(0) % 8 == 0 && aligned16(x.data_ptr()) && weight.stride(1) == 1 &&
                    weight.stride(0) % 8 == 0 && aligned16(weight.data_ptr());
  if (!fast) return lora_linear_composed(x, weight, lora_a, lora_b, scale, bias);
  ShrinkOut sh;
  const auto props = at::cuda::getCurrentDeviceProperties();
  if (K % 32 == 0 && props->major >= 8) {
    // u's partial sums from a few blocks that this kernel overlaps (sm_90).
    at::Tensor a = lora_a.contiguous();
    if (!aligned16(a.data_ptr())) a = a.clone();
    sh.splits = cuda::lora_shrink_splits(K);
    sh.parts = at::empty({sh.splits, M, R}, x.options().dtype(at::kFloat));
    cuda::lora_shrink_partials_launch(x.data_ptr(), x.stride(0), a.data_ptr(), sh.parts.data_ptr<float>(),
                                      static_cast<int>(M), static_cast<int>(R), K, dt, at::cuda::getCurrentCUDAStream());
    sh.pdl = cuda::pdl_enabled(props->major);
  } else {
    sh.u = at::mm(x, lora_a.t());  // [M, r], cuBLAS
  }
  at::Tensor out = at::empty({M, weight.size(0)}, x.options());
  const bool hints = cuda::lora_decode_stream_hints(weight.size(0) * K * static_cast<int64_t>(weight.element_size()));
  const DecodeKernel kernel = pick_kernel(M, K, props->major, hints);
  if (kernel != DecodeKernel::kSimt) {
    const bool has_u = sh.u.defined();
    const cuda::LoraDecodeArgs args{x.data_ptr(), x.stride(0), weight.data_ptr(), weight.stride(0),
                                    has_u ? sh.u.data_ptr() : nullptr, has_u ? sh.u.stride(0) : int64_t{0},
                                    has_u ? nullptr : sh.parts.data_ptr<float>(), sh.splits, lora_b.data_ptr(),
                                    lora_b.stride(0), lora_b.stride(1), bias.has_value() ? bias->data_ptr() : nullptr,
                                    out.data_ptr(), static_cast<int>(M), static_cast<int>(R), K, weight.size(0),
                                    static_cast<float>(scale), cuda::lora_decode_u_together()};
    if (kernel == DecodeKernel::kBulk) {
      cuda::lora_decode_bulk_launch(args, dt, sh.pdl, at::cuda::getCurrentCUDAStream());
    } else {
      cuda::lora_decode_mma_launch(args, dt, sh.pdl, hints, at::cuda::getCurrentCUDAStream());
    }
    return out;
  }
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dt, "lora_decode_cuda", [&] {
    if (M == 1 && hints) launch<scalar_t, 1, true>(x, weight, sh, lora_b, bias, out, scale, R);
    else if (M == 1) launch<scalar_t, 1>(x, weight, sh, lora_b, bias, out, scale, R);
    else if (M <= 2) launch<scalar_t, 2>(x, weight, sh, lora_b, bias, out, scale, R);
    else if (M <= 4) launch<scalar_t, 4>(x, weight, sh, lora_b, bias, out, scale, R);
    else if (M <= 8) launch<scalar_t, 8>(x, weight, sh, lora_b, bias, out, scale, R);
    else launch<scalar_t, 16>(x, weight, sh, lora_b, bias, out, scale, R);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_fused, CUDA, m) { m.impl("lora_decode", &lora_decode_cuda); }

}  // namespace lora_fused
