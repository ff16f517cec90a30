// nf4_linear_ss.h on ATen tensors: checks what the kernel takes, makes u / du where asked, launches.
#include "cuda/nf4_linear_ss.h"

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdlib>

#include "cuda/nf4_gemm_sm90.h"
#include "cuda/nf4_linear_sm90.h"
#include "gemm.h"
#if LORA_FUSED_WITH_SM90
#include "cuda/sm90/nf4_ss_gemm.h"
#endif

namespace lora_fused {
namespace cuda {

bool nf4_ss_requested() { return nf4_gemm_mode() == Nf4GemmMode::kSs; }

bool nf4_ss_for_grad_input(int64_t m, int64_t in_features, int64_t out_features) {
  const Nf4GemmMode md = nf4_gemm_mode();
  return md == Nf4GemmMode::kSs || (md == Nf4GemmMode::kAuto && m >= kSsGradInputMinM && m <= kSsGradInputMaxM &&
                                    in_features <= out_features);
}

#if LORA_FUSED_WITH_SM90
namespace {

int64_t round_up8(int64_t v) { return (v + 7) / 8 * 8; }

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// What the kernel needs of the weight and the activation's dtype and sizes (int32 problem sizes).
bool takes(const at::Tensor& act, const Nf4Weight& w) {
  return act.scalar_type() == at::kBFloat16 && act.size(0) >= 1 && w.blocksize == 64 && w.in_features % 64 == 0 &&
         aligned16(w.packed) && act.size(0) <= INT32_MAX &&
         w.out_features <= INT32_MAX && w.in_features <= INT32_MAX && nf4_gemm_sm90_available();
}

// scales: nf4_group_scales(w, N rounded up to 8), which the caller keeps alive over the launch.
sm90::Nf4SsProblem problem(const at::Tensor& act, const Nf4Weight& w, bool trans, const at::Tensor& scales,
                           const at::Tensor& y) {
  sm90::Nf4SsProblem p;
  p.m = static_cast<int>(act.size(0));
  p.n = static_cast<int>(w.out_features);
  p.k = static_cast<int>(w.in_features);
  p.trans = trans;
  p.act = act.data_ptr();
  p.packed = w.packed.data_ptr<uint8_t>();
  p.scales = scales.data_ptr();
  p.scales_ld = scales.size(1);
  p.y = y.data_ptr();
  return p;
}

// The LoRA pair rides in the kernel when r % 8 == 0 and both are 16-byte aligned (after making them
// contiguous); else false, and the caller adds the term after.
bool set_lora(sm90::Nf4SsProblem& p, at::Tensor& lora_w, at::Tensor& lora_act) {
  lora_w = contiguous_aligned16(lora_w);
  lora_act = contiguous_aligned16(lora_act);
  if (lora_act.size(1) % 8 != 0) return false;
  p.lora_w = lora_w.data_ptr();
  p.lora_act = lora_act.data_ptr();
  p.r = static_cast<int>(lora_act.size(1));
  return true;
}

// The split count: nf4_ss_gemm_splits' choice, or LORA_FUSED_NF4_SS_SPLITS (read at each call; tests
// force splits with it), clamped to the reduction's 64-column tiles.
int splits_for(const sm90::Nf4SsProblem& p) {
  const int64_t k_tiles = ((p.trans ? p.n : p.k) + 63) / 64;
  if (const char* env = std::getenv("LORA_FUSED_NF4_SS_SPLITS"); env != nullptr && env[0] != '\0') {
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && v >= 1, "lora_fused: LORA_FUSED_NF4_SS_SPLITS must be an integer >= 1; got '",
                env, "'");
    return static_cast<int>(std::min<int64_t>(v, k_tiles));
  }
  return sm90::nf4_ss_gemm_splits(p, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

// Launches p, with the fp32 partials of a split reduction where one is chosen (kept alive here until
// the launches are queued: the caching allocator orders their reuse on this stream).
void run(sm90::Nf4SsProblem& p, const at::Tensor& like, const char* op) {
  at::Tensor partials;
  p.splits = splits_for(p);
  if (p.splits > 1) {
    partials = at::empty({p.splits, p.m, p.trans ? p.k : p.n}, like.options().dtype(at::kFloat));
    p.partials = partials.data_ptr<float>();
  }
  const char* why = sm90::nf4_ss_gemm_check(p);
  TORCH_CHECK(why == nullptr, op, ": the NF4 SS GEMM ", why);
  why = sm90::nf4_ss_gemm_run(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(why == nullptr, op, ": the NF4 SS GEMM failed: ", why);
}

}  // namespace
#endif

bool nf4_linear_ss(const at::Tensor& x, const Nf4Weight& w, const c10::optional<at::Tensor>& bias,
                   const c10::optional<at::Tensor>& lora_u, const c10::optional<at::Tensor>& lora_B,
                   const c10::optional<at::Tensor>& lora_A, double lora_scale, at::Tensor& out,
                   at::Tensor* u_out) {
#if LORA_FUSED_WITH_SM90
  if (!takes(x, w)) return false;
  const at::Tensor xc = contiguous_aligned16(x);
  const int64_t m = x.size(0), n = w.out_features;
  out = at::empty({m, n}, x.options());
  at::Tensor bias_c;
  const at::Tensor scales = nf4_group_scales(w, round_up8(n));
  sm90::Nf4SsProblem p = problem(xc, w, /*trans=*/false, scales, out);
  if (bias.has_value()) {
    bias_c = bias->contiguous();
    p.bias = bias_c.data_ptr();
  }
  at::Tensor u, b;
  bool lora_after = false;
  if (lora_u.has_value() || lora_A.has_value()) {
    u = lora_u.has_value() ? *lora_u : nf4_lora_u(xc, *lora_A, lora_scale);
    if (u_out != nullptr) *u_out = u;
    b = *lora_B;
    lora_after = !set_lora(p, b, u);
  }
  run(p, out, "lora_fused.nf4_linear");
  if (lora_after) out.addmm_(u, lora_B->t());
  return true;
#else
  (void)x, (void)w, (void)bias, (void)lora_u, (void)lora_B, (void)lora_A, (void)lora_scale, (void)out, (void)u_out;
  return false;
#endif
}

bool nf4_linear_grad_input_ss(const at::Tensor& grad_out, const Nf4Weight& w, const c10::optional<at::Tensor>& lora_du,
                              const c10::optional<at::Tensor>& lora_A, const c10::optional<at::Tensor>& lora_B,
                              double lora_scale, at::Tensor& out) {
#if LORA_FUSED_WITH_SM90
  if (!takes(grad_out, w) || w.out_features % 8 != 0) return false;
  const at::Tensor dyc = contiguous_aligned16(grad_out);
  out = at::empty({grad_out.size(0), w.in_features}, grad_out.options());
  const at::Tensor scales = nf4_group_scales(w, round_up8(w.out_features));
  sm90::Nf4SsProblem p = problem(dyc, w, /*trans=*/true, scales, out);
  at::Tensor du, a;
  bool lora_after = false;
  if (lora_A.has_value() && (lora_du.has_value() || lora_B.has_value())) {
    du = lora_du.has_value() ? *lora_du : gemm(dyc, *lora_B, lora_scale);
    a = *lora_A;
    lora_after = !set_lora(p, a, du);
  }
  run(p, out, "lora_fused.nf4_linear_grad_input");
  if (lora_after) out.addmm_(du, *lora_A);
  return true;
#else
  (void)grad_out, (void)w, (void)lora_du, (void)lora_A, (void)lora_B, (void)lora_scale, (void)out;
  return false;
#endif
}

}  // namespace cuda
}  // namespace lora_fused
