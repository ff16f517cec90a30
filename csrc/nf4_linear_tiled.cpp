// The tiled NF4 matmul shared by the CPU and CUDA implementations: decode a slab of the weight,
// multiply it with the backend's GEMM (cuBLAS on CUDA) straight into its block of the output, next
// slab. Extra memory is one slab, never the full 16-bit weight.
#include <cstdlib>

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

// Slab extent along a dimension of `extent`, given `per` elements per unit: a multiple of `align`
// when the slab is at least that big (GEMM tiles), at least 1.
int64_t slab_extent(int64_t budget, int64_t per, int64_t extent, int64_t align) {
  int64_t s = std::max<int64_t>(1, budget / per);
  if (s >= extent) return extent;
  if (s >= align) s -= s % align;
  return s;
}

}  // namespace

at::Tensor nf4_lora_u(const at::Tensor& x, const at::Tensor& lora_A, double scale) {
  at::Tensor u = at::mm(x, lora_A.t());
  return scale == 1.0 ? u : u.mul_(scale);
}

at::Tensor nf4_linear_tiled(const at::Tensor& x, const Nf4Weight& w, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& lora_u, const c10::optional<at::Tensor>& lora_B,
                            const DequantRect& dequant) {
  const int64_t m = x.size(0), n = w.out_features, k = w.in_features;
  const at::ScalarType t = x.scalar_type();
  const int64_t rows = slab_extent(nf4_slab_elems(n, k), k, n, 128);
  if (m == 0) return at::empty({0, n}, x.options());
  if (rows == n && !lora_u.has_value()) {  // one slab: the GEMM takes the bias in its epilogue
    const at::Tensor wt = dequant(w, 0, n, 0, k, t).t();
    return bias.has_value() ? at::addmm(*bias, x, wt) : at::mm(x, wt);
  }
  // The bias and LoRA terms first, then every slab's GEMM accumulates onto its column block (beta = 1).
  at::Tensor out;
  if (lora_u.has_value()) {
    out = bias.has_value() ? at::addmm(*bias, *lora_u, lora_B->t()) : at::mm(*lora_u, lora_B->t());
  } else if (bias.has_value()) {
    out = at::empty({m, n}, x.options());  // not expand().contiguous(): at M = 1 that aliases bias
    out.copy_(bias->expand({m, n}));
  } else {
    out = at::empty({m, n}, x.options());
  }
  const bool accumulate = lora_u.has_value() || bias.has_value();
  for (int64_t n0 = 0; n0 < n; n0 += rows) {
    const int64_t r = std::min(rows, n - n0);
    const at::Tensor wt = dequant(w, n0, r, 0, k, t).t();
    at::Tensor block = out.narrow(1, n0, r);
    if (accumulate) {
      block.addmm_(x, wt);
    } else {
      at::mm_out(block, x, wt);
    }
  }
  return out;
}

at::Tensor nf4_linear_grad_input_tiled(const at::Tensor& grad_out, const Nf4Weight& w,
                                       const c10::optional<at::Tensor>& lora_du,
                                       const c10::optional<at::Tensor>& lora_A, const DequantRect& dequant) {
  const int64_t m = grad_out.size(0), n = w.out_features, k = w.in_features;
  const at::ScalarType t = grad_out.scalar_type();
  if (m == 0) return at::empty({0, k}, grad_out.options());
  const int64_t cols = slab_extent(nf4_slab_elems(n, k), n, k, 64);
  if (!lora_du.has_value()) {
    if (cols == k) return at::mm(grad_out, dequant(w, 0, n, 0, k, t));
    at::Tensor out = at::empty({m, k}, grad_out.options());
    for (int64_t k0 = 0; k0 < k; k0 += cols) {
      const int64_t c = std::min(cols, k - k0);
      at::Tensor block = out.narrow(1, k0, c);
      at::mm_out(block, grad_out, dequant(w, 0, n, k0, c, t));
    }
    return out;
  }
  // The LoRA term first (one skinny GEMM), then every slab's GEMM adds onto its column block.
  at::Tensor out = at::mm(*lora_du, *lora_A);
  for (int64_t k0 = 0; k0 < k; k0 += cols) {
    const int64_t c = std::min(cols, k - k0);
    out.narrow(1, k0, c).addmm_(grad_out, dequant(w, 0, n, k0, c, t));
  }
  return out;
}

}  // namespace lora_fused
