// The tiled NF4 matmul shared by the CPU and CUDA implementations: decode a slab of the weight,
// multiply it with the backend's GEMM (cuBLAS on CUDA) straight into its block of the output, next
// slab. Extra memory is one slab, never the full 16-bit weight.
#include <cstdlib>
#include <string>
#include <utility>

#include "gemm.h"
#include "nf4_linear.h"

namespace lora_fused {

int64_t nf4_slab_elems(int64_t n, int64_t k) {
  if (const char* env = std::getenv("LORA_FUSED_NF4_SLAB_ELEMS")) {
    const long long v = std::atoll(env);
    if (v > 0) return v;
  }
  const int64_t quarter = n * k / 4;
  return std::min<int64_t>(std::max<int64_t>(quarter, int64_t{1} << 22), int64_t{1} << 24);
}

namespace {

// Slab extent along a dimension of `extent`, given `per` elements per unit: as few slabs as the
// budget allows, of about equal size (a short last slab is a skinny GEMM and two more launches of
// its own: 4096->11008 took 4 x 2688 rows + 256), rounded up to a multiple of `align` when at least
// that big (GEMM tiles; so up to align - 1 units over the budget), at least 1.
int64_t slab_extent(int64_t budget, int64_t per, int64_t extent, int64_t align) {
  const int64_t s = std::max<int64_t>(1, budget / per);
  if (s >= extent) return extent;
  const int64_t count = (extent + s - 1) / s;
  int64_t even = (extent + count - 1) / count;
  if (even >= align) even = (even + align - 1) / align * align;
  return std::min(even, extent);
}

}  // namespace

at::Tensor nf4_lora_u(const at::Tensor& x, const at::Tensor& lora_A, double scale) {
  return gemm(x, lora_A.t(), scale);
}

Nf4Merge nf4_merge_mode() {
  const char* env = std::getenv("LORA_FUSED_NF4_MERGE");
  if (env == nullptr || *env == '\0') return Nf4Merge::kAuto;
  const std::string v(env);
  if (v == "0") return Nf4Merge::kNever;
  if (v == "1") return Nf4Merge::kKernel;
  if (v == "gemm") return Nf4Merge::kGemm;
  TORCH_CHECK(false, "LORA_FUSED_NF4_MERGE must be unset, 0, 1 or gemm; got '", v, "'");
}

at::Tensor nf4_linear_tiled(const at::Tensor& x, const Nf4Weight& w, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& lora_u_in, const c10::optional<at::Tensor>& lora_B,
                            const c10::optional<at::Tensor>& lora_A, double lora_scale, const DequantRect& dequant,
                            const DequantRectLora& dequant_lora, at::Tensor* u_out) {
  const int64_t m = x.size(0), n = w.out_features, k = w.in_features;
  const at::ScalarType t = x.scalar_type();
  const int64_t rows = slab_extent(nf4_slab_elems(n, k), k, n, 128);
  const bool want_u = u_out != nullptr && lora_A.has_value() && !lora_u_in.has_value();
  const int64_t rank = lora_A.has_value() ? lora_A->size(0) : 0;
  if (m == 0) {
    if (want_u) *u_out = at::empty({0, rank}, x.options());
    return at::empty({0, n}, x.options());
  }
  // Merged, u can come from the first slab's GEMM: lora_A as `rank` more rows of the slab writes
  // x A^T into the next slab's first columns, read out before that slab's GEMM overwrites them (with
  // a bias there, they would not start at zero).
  const bool u_in_slab0 = want_u && !bias.has_value() && rows < n && rows + rank <= n;
  const int64_t spare0 = u_in_slab0 ? rank : 0;
  const Nf4Merge mode = nf4_merge_mode();
  bool merge = false;
  at::Tensor first_slab;  // kAuto: the first slab, merged by the kernel (undefined: it does not apply)
  if (lora_A.has_value() && !lora_u_in.has_value()) {
    if (mode == Nf4Merge::kAuto) {
      if (dequant_lora && m >= kNf4MergeMinRows) {
        const int64_t r = std::min(rows, n);
        first_slab = dequant_lora(w, 0, r, 0, k, lora_B->narrow(0, 0, r), *lora_A, lora_scale, spare0);
        merge = first_slab.defined();
      }
    } else {
      merge = mode != Nf4Merge::kNever;
    }
  }
  const c10::optional<at::Tensor> lora_u = lora_A.has_value() && !merge && !lora_u_in.has_value()
                                               ? c10::optional<at::Tensor>(nf4_lora_u(x, *lora_A, lora_scale))
                                               : lora_u_in;
  // Rows [n0, n0 + r) of W (+ lora_scale * lora_B[n0:] @ lora_A when merging), then `spare` rows.
  const bool one_pass = merge && dequant_lora && mode != Nf4Merge::kGemm;
  const auto slab = [&](int64_t n0, int64_t r, int64_t spare) {
    if (n0 == 0 && first_slab.defined()) return std::exchange(first_slab, at::Tensor());  // one slab alive
    if (one_pass) {
      const at::Tensor ws = dequant_lora(w, n0, r, 0, k, lora_B->narrow(0, n0, r), *lora_A, lora_scale, spare);
      if (ws.defined()) return ws;
    }
    at::Tensor ws = dequant(w, n0, r, 0, k, t, spare);
    if (merge) ws.narrow(0, 0, r).addmm_(lora_B->narrow(0, n0, r), *lora_A, 1.0, lora_scale);
    return ws;
  };
  if (rows == n && !lora_u.has_value()) {  // one slab: the GEMM takes the bias in its epilogue
    const at::Tensor wt = slab(0, n, 0).t();
    if (want_u) *u_out = nf4_lora_u(x, *lora_A, lora_scale);
    return bias.has_value() ? at::addmm(*bias, x, wt) : gemm(x, wt);
  }
  // The bias and LoRA terms first, then every slab's GEMM accumulates onto its column block (beta = 1).
  at::Tensor out;
  if (lora_u.has_value() && bias.has_value()) {
    out = at::addmm(*bias, *lora_u, lora_B->t());
  } else if (lora_u.has_value()) {
    out = gemm(*lora_u, lora_B->t());
  } else if (bias.has_value()) {
    out = at::empty({m, n}, x.options());  // not expand().contiguous(): at M = 1 that aliases bias
    out.copy_(bias->expand({m, n}));
  } else {
    out = at::empty({m, n}, x.options());
  }
  const bool accumulate = lora_u.has_value() || bias.has_value();
  for (int64_t n0 = 0; n0 < n; n0 += rows) {
    const int64_t r = std::min(rows, n - n0);
    if (n0 == 0 && merge && u_in_slab0) {  // merged: no LoRA term, no bias, so out starts unwritten
      at::Tensor ws = slab(0, r, rank);
      ws.narrow(0, r, rank).copy_(*lora_A);
      gemm_into(out.narrow(1, 0, r + rank), x, ws.t(), 1.0, false);
      *u_out = out.narrow(1, r, rank).mul(lora_scale).contiguous();
      continue;
    }
    gemm_into(out.narrow(1, n0, r), x, slab(n0, r, 0).t(), 1.0, accumulate);
  }
  if (want_u && !(merge && u_in_slab0)) *u_out = lora_u.has_value() ? *lora_u : nf4_lora_u(x, *lora_A, lora_scale);
  return out;
}

at::Tensor nf4_linear_grad_input_tiled(const at::Tensor& grad_out, const Nf4Weight& w,
                                       const c10::optional<at::Tensor>& lora_du_in,
                                       const c10::optional<at::Tensor>& lora_A,
                                       const c10::optional<at::Tensor>& lora_B, double lora_scale,
                                       const DequantRect& dequant, const DequantRectLora& dequant_lora) {
  const int64_t m = grad_out.size(0), n = w.out_features, k = w.in_features;
  const at::ScalarType t = grad_out.scalar_type();
  if (m == 0) return at::empty({0, k}, grad_out.options());
  const int64_t cols = slab_extent(nf4_slab_elems(n, k), n, k, 64);
  // Given both lora_du (= lora_scale * grad_out @ lora_B) and lora_B, either form will do.
  const Nf4Merge mode = nf4_merge_mode();
  bool merge = false;
  at::Tensor first_slab;  // kAuto: the first slab, merged by the kernel (undefined: it does not apply)
  if (lora_B.has_value() && !lora_du_in.has_value()) {
    merge = true;
  } else if (lora_B.has_value() && mode == Nf4Merge::kAuto) {
    if (dequant_lora && m >= kNf4MergeMinRows) {
      const int64_t c = std::min(cols, k);
      first_slab = dequant_lora(w, 0, n, 0, c, *lora_B, lora_A->narrow(1, 0, c), lora_scale, 0);
      merge = first_slab.defined();
    }
  } else if (lora_B.has_value()) {
    merge = mode != Nf4Merge::kNever;
  }
  c10::optional<at::Tensor> lora_du;
  if (!merge && lora_A.has_value()) {
    lora_du = lora_du_in.has_value() ? *lora_du_in : nf4_lora_u(grad_out, lora_B->t(), lora_scale);
  }
  // Columns [k0, k0 + c) of W (+ lora_scale * lora_B @ lora_A[:, k0:] when merging).
  const bool one_pass = merge && dequant_lora && mode != Nf4Merge::kGemm;
  const auto slab = [&](int64_t k0, int64_t c) {
    if (k0 == 0 && first_slab.defined()) return std::exchange(first_slab, at::Tensor());  // one slab alive
    if (one_pass) {
      const at::Tensor ws = dequant_lora(w, 0, n, k0, c, *lora_B, lora_A->narrow(1, k0, c), lora_scale, 0);
      if (ws.defined()) return ws;
    }
    at::Tensor ws = dequant(w, 0, n, k0, c, t, 0);
    if (merge) ws.addmm_(*lora_B, lora_A->narrow(1, k0, c), 1.0, lora_scale);
    return ws;
  };
  if (!lora_du.has_value()) {
    if (cols == k) return gemm(grad_out, slab(0, k));
    at::Tensor out = at::empty({m, k}, grad_out.options());
    for (int64_t k0 = 0; k0 < k; k0 += cols) {
      const int64_t c = std::min(cols, k - k0);
      gemm_into(out.narrow(1, k0, c), grad_out, slab(k0, c), 1.0, false);
    }
    return out;
  }
  // The LoRA term first (one skinny GEMM), then every slab's GEMM adds onto its column block.
  at::Tensor out = gemm(*lora_du, *lora_A);
  for (int64_t k0 = 0; k0 < k; k0 += cols) {
    const int64_t c = std::min(cols, k - k0);
    gemm_into(out.narrow(1, k0, c), grad_out, slab(k0, c), 1.0, true);
  }
  return out;
}

}  // namespace lora_fused
