// gemm_concat_k on CUDA. On Hopper (sm_90, a build with sm_90a and CUTLASS), bf16/fp16 operands
// with one unit stride each and 16-byte aligned pointers and leading dimensions can run one CUTLASS
// kernel over K1 + K2 (cuda/sm90/), when LORA_FUSED_GEMM_CONCAT_K asks for it (requested_path);
// everything else runs gemm_concat_k_composed (cuBLAS, the LoRA term as the accumulator, beta = 1).
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "checks.h"
#include "cuda/common.cuh"
#include "gemm_concat_k.h"

#if LORA_FUSED_WITH_SM90
#include <cutlass/numeric_types.h>

#include "cuda/sm90/gemm_concat_k.cuh"
#endif

namespace lora_fused {
namespace {

#if LORA_FUSED_WITH_SM90
// b given as [N, K] is "K-major" with unit stride along K (a weight as stored) and "N-major" with
// unit stride along N (a transposed view, as Wᵀ in the input gradient). 0: neither.
int b_major(const at::Tensor& b) {
  if (b.stride(1) == 1 && (b.size(0) == 1 || b.stride(0) >= b.size(1))) return 1;
  if (b.stride(0) == 1 && (b.size(1) == 1 || b.stride(1) >= b.size(0))) return 2;
  return 0;
}

int64_t b_ld(const at::Tensor& b, int major) {
  if (major == 1) return b.size(0) == 1 ? b.size(1) : b.stride(0);
  return b.size(1) == 1 ? b.size(0) : b.stride(1);
}

template <class T, bool kBKMajor>
bool run_sm90(const sm90::ConcatKProblem& p) {
  if (!sm90::gemm_concat_k_can_implement<T, kBKMajor>(p)) return false;
  const size_t ws_bytes = sm90::gemm_concat_k_workspace_bytes<T, kBKMajor>(p);
  at::Tensor ws;
  if (ws_bytes > 0) {
    ws = at::empty({static_cast<int64_t>(ws_bytes)}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA));
  }
  const char* err =
      sm90::gemm_concat_k_run<T, kBKMajor>(p, ws_bytes > 0 ? ws.data_ptr() : nullptr, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, "lora_fused.gemm_concat_k: the Hopper GEMM failed: ", err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// Whether the 128x256 tiles fill the GPU well enough for the Hopper kernel to beat cuBLAS, which
// picks smaller tiles or split-K for few tiles. Measured on an H100 (random bf16, r = 16): at
// M = 512 with N = 4096 (64 tiles) and N = 11008 (172 tiles: 1.3 waves) the kernel took 1.3-1.6x
// cuBLAS's mm; from ~2 full waves on it is within a few % of it. The last wave must be >= 3/4 full.
bool fills_the_gpu(int64_t m, int64_t n, int sm_count) {
  const int64_t tiles = cuda::ceil_div<int64_t>(m, 128) * cuda::ceil_div<int64_t>(n, 256);
  const int64_t waves = cuda::ceil_div<int64_t>(tiles, sm_count);
  return tiles >= sm_count && 4 * tiles >= 3 * waves * sm_count;
}

// Which path runs, from LORA_FUSED_GEMM_CONCAT_K (read per call, so tests and benchmarks can switch):
//   unset / "composed": cuBLAS (the default for now: on an H100 under random bf16 data the Hopper
//       kernel took 1.05-1.2x cuBLAS's time for the same GEMM, so the layer gained nothing; see
//       benchmarks/RESULTS.md, "Session 5");
//   "auto": the Hopper kernel where fills_the_gpu says its tiles fill the GPU;
//   "sm90": the Hopper kernel wherever it can run (tests check it on small odd shapes too).
enum class Path { kAuto, kSm90, kComposed };
Path requested_path() {
  const char* v = std::getenv("LORA_FUSED_GEMM_CONCAT_K");
  if (v == nullptr) return Path::kComposed;
  if (std::strcmp(v, "sm90") == 0) return Path::kSm90;
  if (std::strcmp(v, "auto") == 0) return Path::kAuto;
  return Path::kComposed;
}

// The Hopper kernel, when it applies; false leaves `out` untouched.
bool try_sm90(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, const at::Tensor& b2,
              const c10::optional<at::Tensor>& bias, at::Tensor& out) {
  const auto dtype = a.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major != 9 || prop->minor != 0) return false;
  const Path path = requested_path();
  if (path == Path::kComposed) return false;
  if (path == Path::kAuto && !fills_the_gpu(a.size(0), b.size(0), prop->multiProcessorCount)) return false;
  const int major = b_major(b);
  if (major == 0 || b_major(b2) != major) return false;
  if (a.stride(1) != 1 && a.size(1) != 1) return false;
  if (a2.stride(1) != 1 && a2.size(1) != 1) return false;
  const int64_t limit = std::numeric_limits<int>::max();
  if (a.size(0) > limit || b.size(0) > limit || a.size(1) > limit || a2.size(1) > limit) return false;
  if (bias.has_value() && bias->stride(0) != 1 && bias->size(0) != 1) return false;
  sm90::ConcatKProblem p;
  p.m = static_cast<int>(a.size(0));
  p.n = static_cast<int>(b.size(0));
  p.k1 = static_cast<int>(a.size(1));
  p.k2 = static_cast<int>(a2.size(1));
  p.a1 = a.data_ptr();
  p.a2 = a2.data_ptr();
  p.b1 = b.data_ptr();
  p.b2 = b2.data_ptr();
  p.lda1 = a.size(0) == 1 ? a.size(1) : a.stride(0);
  p.lda2 = a2.size(0) == 1 ? a2.size(1) : a2.stride(0);
  p.ldb1 = b_ld(b, major);
  p.ldb2 = b_ld(b2, major);
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.sm_count = prop->multiProcessorCount;
  // Groups of tiles along the minor direction keep a wave's operand panels in L2. In the tuning probe
  // (scripts/tune_gemm_concat_k) the best swizzle, most often 4, took 8192x8192x8192 from 1.06x
  // cuBLAS's time to 0.99x and 4096x8192x8192 from 1.09x to 1.05x; in the layer benchmark the
  // difference between 1 and 4 was within run-to-run spread.
  p.swizzle = 4;
  out = at::empty({a.size(0), b.size(0)}, a.options());
  p.d = out.data_ptr();
  bool ran;
  if (dtype == at::kBFloat16) {
    ran = major == 1 ? run_sm90<cutlass::bfloat16_t, true>(p) : run_sm90<cutlass::bfloat16_t, false>(p);
  } else {
    ran = major == 1 ? run_sm90<cutlass::half_t, true>(p) : run_sm90<cutlass::half_t, false>(p);
  }
  if (!ran) out = at::Tensor();
  return ran;
}
#endif

at::Tensor gemm_concat_k_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, const at::Tensor& b2,
                              const c10::optional<at::Tensor>& bias) {
  check_gemm_concat_k_args(a, b, a2, b2, bias, at::kCUDA);
  const c10::cuda::CUDAGuard guard(a.device());
  if (a.size(0) == 0 || b.size(0) == 0 || a.size(1) == 0 || a2.size(1) == 0) {
    return gemm_concat_k_composed(a, b, a2, b2, bias);
  }
#if LORA_FUSED_WITH_SM90
  at::Tensor out;
  if (try_sm90(a, b, a2, b2, bias, out)) return out;
#endif
  return gemm_concat_k_composed(a, b, a2, b2, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_fused, CUDA, m) { m.impl("gemm_concat_k", &gemm_concat_k_cuda); }

}  // namespace lora_fused
