// gemm_into on CUDA through cuBLASLt, with the matmul descriptor, layouts and algorithm cached per
// problem (shape, strides, dtype, pointer alignment, beta, device). torch.mm asks cuBLAS's
// heuristic on every call: 20-40 us of host per GEMM on the H100 machine, 137 us for addmm with
// alpha (torch.profiler, benchmarks/RESULTS.md), so the NF4 slab loop (a GEMM per slab) and the LoRA
// terms beside it left the GPU idle between kernels. A cached call is one cublasLtMatmul, with
// torch's own cuBLASLt workspace for the stream (so memory is what torch.mm's would be).
// Row-major out [m, n] = a [m, k] @ b [k, n] is, in cuBLAS's column-major terms, out^T = b^T a^T:
// each operand's storage read column-major is its transpose when it is row-major (op N) and the
// matrix itself when it is column-major (op T).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>

#include <memory>
#include <mutex>
#include <unordered_map>

#include "gemm.h"

namespace lora_fused {
namespace cuda {
namespace {

#define LORA_FUSED_CUBLASLT_CHECK(expr)                                                                  \
  do {                                                                                                  \
    const cublasStatus_t status_ = (expr);                                                              \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "lora_fused: ", #expr, " failed: ",                   \
                cublasLtGetStatusString(status_));                                                      \
  } while (0)


// A 2-D tensor as cuBLAS sees it: `stored` rows x cols column-major with leading dimension ld, and
// whether its transpose (op T) or the storage itself (op N) is the tensor's transpose.
struct Operand {
  bool trans = false;
  uint64_t rows = 0, cols = 0;
  int64_t ld = 0;
};

bool describe(const at::Tensor& t, Operand& o) {
  const int64_t r = t.size(0), c = t.size(1);
  if (t.stride(1) == 1 && (r == 1 || t.stride(0) >= c)) {  // row-major: storage is t^T [c, r]
    o = {false, static_cast<uint64_t>(c), static_cast<uint64_t>(r), std::max<int64_t>(t.stride(0), c)};
    return true;
  }
  if (t.stride(0) == 1 && (c == 1 || t.stride(1) >= r)) {  // column-major: storage is t [r, c]
    o = {true, static_cast<uint64_t>(r), static_cast<uint64_t>(c), std::max<int64_t>(t.stride(1), r)};
    return true;
  }
  return false;
}

// The largest power of two dividing the address, up to 256 (cuBLASLt's default assumption).
uint32_t alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t low = a & (~a + 1);
  return low == 0 || low > 256 ? 256u : static_cast<uint32_t>(low);
}

struct Key {
  int device, dtype;
  bool trans_p, trans_q, accumulate;
  uint64_t p_rows, p_cols, q_rows, q_cols;
  int64_t ld_p, ld_q, ld_d, m, n;
  uint32_t align_p, align_q, align_d;
  bool operator==(const Key& o) const {
    return device == o.device && dtype == o.dtype && trans_p == o.trans_p && trans_q == o.trans_q &&
           accumulate == o.accumulate && p_rows == o.p_rows && p_cols == o.p_cols && q_rows == o.q_rows &&
           q_cols == o.q_cols && ld_p == o.ld_p && ld_q == o.ld_q && ld_d == o.ld_d && m == o.m && n == o.n &&
           align_p == o.align_p && align_q == o.align_q && align_d == o.align_d;
  }
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = 1469598103934665603ull;
    const auto mix = [&h](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
    mix(k.device), mix(k.dtype), mix(k.trans_p | k.trans_q << 1 | k.accumulate << 2), mix(k.p_rows), mix(k.p_cols);
    mix(k.q_rows), mix(k.q_cols), mix(k.ld_p), mix(k.ld_q), mix(k.ld_d), mix(k.m), mix(k.n);
    mix(k.align_p | uint64_t{k.align_q} << 16 | uint64_t{k.align_d} << 32);
    return h;
  }
};

// Everything cublasLtMatmul needs but the pointers and scalars; ok is false where the heuristic
// found no algorithm (the caller then uses ATen).
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t p = nullptr, q = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
  bool ok = false;
  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (d != nullptr) cublasLtMatrixLayoutDestroy(d);
    if (q != nullptr) cublasLtMatrixLayoutDestroy(q);
    if (p != nullptr) cublasLtMatrixLayoutDestroy(p);
    if (desc != nullptr) cublasLtMatmulDescDestroy(desc);
  }
};

std::shared_ptr<const Plan> make_plan(const Key& key, cudaDataType_t type, cublasLtHandle_t handle) {
  auto plan = std::make_shared<Plan>();
  LORA_FUSED_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_p = key.trans_p ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_q = key.trans_q ? CUBLAS_OP_T : CUBLAS_OP_N;
  LORA_FUSED_CUBLASLT_CHECK(
      cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_p, sizeof(op_p)));
  LORA_FUSED_CUBLASLT_CHECK(
      cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_q, sizeof(op_q)));
  LORA_FUSED_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&plan->p, type, key.p_rows, key.p_cols, key.ld_p));
  LORA_FUSED_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&plan->q, type, key.q_rows, key.q_cols, key.ld_q));
  LORA_FUSED_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&plan->d, type, key.n, key.m, key.ld_d));

  cublasLtMatmulPreference_t pref = nullptr;
  LORA_FUSED_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>, decltype(&cublasLtMatmulPreferenceDestroy)>
      pref_guard(pref, &cublasLtMatmulPreferenceDestroy);
  // torch's own cuBLASLt workspace for this stream (kept, so no allocation per call, and the peak
  // memory of a layer is what torch.mm's would be).
  const uint64_t max_ws = at::cuda::getCUDABlasLtWorkspaceSize();
  LORA_FUSED_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                                 &max_ws, sizeof(max_ws)));
  // Split-K only with a reduction in fp32 through the workspace: no in-place (atomic) reduction, no
  // rounding of partial sums to 16 bits, so results are reproducible and as accurate as one pass.
  const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  LORA_FUSED_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                                                 &schemes, sizeof(schemes)));
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_p},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_q},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_d},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_d}};
  for (const auto& [attr, bytes] : aligns) {
    LORA_FUSED_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &bytes, sizeof(bytes)));
  }
  cublasLtMatmulHeuristicResult_t result{};
  int returned = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle, plan->desc, plan->p, plan->q, plan->d, plan->d,
                                                           pref, 1, &result, &returned);
  if (st == CUBLAS_STATUS_SUCCESS && returned > 0 && result.state == CUBLAS_STATUS_SUCCESS) {
    plan->algo = result.algo;
    plan->workspace = result.workspaceSize;
    plan->ok = true;
  }
  return plan;
}

std::shared_ptr<const Plan> find_plan(const Key& key, cudaDataType_t type, cublasLtHandle_t handle) {
  static std::mutex mutex;
  static std::unordered_map<Key, std::shared_ptr<const Plan>, KeyHash> plans;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = plans.find(key);
    if (it != plans.end()) return it->second;
  }
  std::shared_ptr<const Plan> plan = make_plan(key, type, handle);  // outside the lock: the heuristic is slow
  const std::lock_guard<std::mutex> lock(mutex);
  if (plans.size() >= 4096) plans.clear();  // bounded: a model sees few shapes, varying token counts many
  return plans.emplace(key, std::move(plan)).first->second;
}

}  // namespace

bool blaslt_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha, bool accumulate) {
  const at::ScalarType t = out.scalar_type();
  if (t != at::kBFloat16 && t != at::kHalf) return false;
  if (a.scalar_type() != t || b.scalar_type() != t || a.dim() != 2 || b.dim() != 2 || out.dim() != 2) return false;
  if (!a.is_cuda() || !b.is_cuda() || a.device() != out.device() || b.device() != out.device()) return false;
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (b.size(0) != k || out.size(0) != m || out.size(1) != n || m == 0 || n == 0 || k == 0) return false;
  if (out.stride(1) != 1 || (m > 1 && out.stride(0) < n)) return false;
  Operand p, q;  // cuBLAS's A = b^T's storage, B = a^T's: out^T [n, m] = op(p) [n, k] op(q) [k, m]
  if (!describe(b, p) || !describe(a, q)) return false;
  const Key key{out.get_device(), static_cast<int>(t), p.trans, q.trans, accumulate, p.rows, p.cols, q.rows, q.cols,
                p.ld, q.ld, std::max<int64_t>(out.stride(0), n), m, n, alignment(b.data_ptr()),
                alignment(a.data_ptr()), alignment(out.data_ptr())};
  const c10::cuda::CUDAGuard guard(out.device());
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const std::shared_ptr<const Plan> plan = find_plan(key, t == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F, handle);
  if (!plan->ok) return false;
  if (plan->workspace > at::cuda::getCUDABlasLtWorkspaceSize()) return false;  // resized since the plan was made
  void* workspace = plan->workspace > 0 ? at::cuda::getCUDABlasLtWorkspace() : nullptr;
  const float alpha_f = static_cast<float>(alpha), beta_f = accumulate ? 1.0f : 0.0f;
  LORA_FUSED_CUBLASLT_CHECK(cublasLtMatmul(handle, plan->desc, &alpha_f, b.data_ptr(), plan->p, a.data_ptr(), plan->q,
                                           &beta_f, out.data_ptr(), plan->d, out.data_ptr(), plan->d, &plan->algo,
                                           workspace, plan->workspace,
                                           at::cuda::getCurrentCUDAStream()));
  return true;
}

}  // namespace cuda
}  // namespace lora_fused
