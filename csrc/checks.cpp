// Definitions of the argument checks declared in checks.h.
#include "checks.h"

#include "nf4_linear.h"

#include <sstream>

namespace lora_fused {

std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << t.scalar_type() << " tensor of shape " << t.sizes() << " on " << t.device();
  return s.str();
}

bool is_lora_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_lora_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(is_lora_dtype(t.scalar_type()), op, ": ", name,
                   " must be bfloat16, float16, float32 or float64; got a ", describe(t));
}

void check_rank(const at::Tensor& t, int64_t rank, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == rank, op, ": ", name, " must have ", rank, " dimensions; got a ", describe(t));
}

void check_same(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb, const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", na, " and ", nb, " must be on the same device; got ", describe(a),
              " and ", describe(b));
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", na, " and ", nb,
                   " must have the same dtype; got ", describe(a), " and ", describe(b));
}

void check_device(const at::Tensor& t, at::DeviceType want, const char* op, const char* name) {
  TORCH_CHECK(t.device().type() == want, op, ": ", name, " must be on ", want, "; got a ", describe(t));
}

void check_lora_shrink_args(const at::Tensor& x, const at::Tensor& a) {
  const char* op = "lora_fused.lora_shrink";
  check_lora_dtype(x, op, "x");
  check_rank(x, 2, op, "x");
  check_rank(a, 2, op, "lora_A");
  check_same(x, "x", a, "lora_A", op);
  TORCH_CHECK_VALUE(a.size(0) >= 1, op, ": the rank r = lora_A.shape[0] must be at least 1; got ", describe(a));
  TORCH_CHECK_VALUE(x.size(1) == a.size(1), op, ": x is [M, k] and lora_A is [r, k], so their last dimensions must agree; got x ",
                    x.sizes(), " and lora_A ", a.sizes());
}

void check_lora_adapter_grads_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& a,
                                   const at::Tensor& b, const c10::optional<at::Tensor>& u) {
  const char* op = "lora_fused.lora_adapter_grads";
  check_lora_dtype(dy, op, "grad_out");
  check_rank(dy, 2, op, "grad_out");
  check_rank(x, 2, op, "x");
  check_rank(a, 2, op, "lora_A");
  check_rank(b, 2, op, "lora_B");
  check_same(dy, "grad_out", x, "x", op);
  check_same(dy, "grad_out", a, "lora_A", op);
  check_same(dy, "grad_out", b, "lora_B", op);
  TORCH_CHECK_VALUE(a.size(0) >= 1, op, ": the rank r = lora_A.shape[0] must be at least 1; got ", describe(a));
  TORCH_CHECK_VALUE(x.size(0) == dy.size(0) && a.size(1) == x.size(1) && b.size(0) == dy.size(1) &&
                        b.size(1) == a.size(0),
                    op, ": expected grad_out [M, N], x [M, K], lora_A [r, K], lora_B [N, r]; got grad_out ",
                    dy.sizes(), ", x ", x.sizes(), ", lora_A ", a.sizes(), ", lora_B ", b.sizes());
  if (u.has_value()) {
    check_same(dy, "grad_out", *u, "u", op);
    TORCH_CHECK_VALUE(u->dim() == 2 && u->size(0) == dy.size(0) && u->size(1) == a.size(0), op,
                      ": u must be [M, r] = [", dy.size(0), ", ", a.size(0), "]; got a ", describe(*u));
  }
}

void check_lora_expand_args(const at::Tensor& y, const at::Tensor& u, const at::Tensor& b) {
  const char* op = "lora_fused.lora_expand";
  check_lora_dtype(y, op, "y");
  check_rank(y, 2, op, "y");
  check_rank(u, 2, op, "u");
  check_rank(b, 2, op, "lora_B");
  check_same(y, "y", u, "u", op);
  check_same(y, "y", b, "lora_B", op);
  TORCH_CHECK_VALUE(b.size(1) >= 1, op, ": the rank r = lora_B.shape[1] must be at least 1; got ", describe(b));
  TORCH_CHECK_VALUE(u.size(0) == y.size(0) && u.size(1) == b.size(1) && b.size(0) == y.size(1), op,
                    ": expected y [M, d], u [M, r], lora_B [d, r]; got y ", y.sizes(), ", u ", u.sizes(), ", lora_B ",
                    b.sizes());
}

void check_lora_linear_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b,
                            const c10::optional<at::Tensor>& bias, const char* op) {
  check_lora_dtype(x, op, "x");
  check_rank(x, 2, op, "x");
  check_rank(weight, 2, op, "weight");
  check_rank(a, 2, op, "lora_A");
  check_rank(b, 2, op, "lora_B");
  check_same(x, "x", weight, "weight", op);
  check_same(x, "x", a, "lora_A", op);
  check_same(x, "x", b, "lora_B", op);
  const int64_t d = weight.size(0), k = weight.size(1), r = a.size(0);
  TORCH_CHECK_VALUE(r >= 1 && x.size(1) == k && a.size(1) == k && b.size(0) == d && b.size(1) == r, op,
                    ": expected x [M, k], weight [d, k], lora_A [r, k], lora_B [d, r] with r >= 1; got x ", x.sizes(),
                    ", weight ", weight.sizes(), ", lora_A ", a.sizes(), ", lora_B ", b.sizes());
  if (bias.has_value()) {
    check_same(x, "x", *bias, "bias", op);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == d, op, ": bias must have shape [", d, "]; got a ",
                      describe(*bias));
  }
}

void check_blocksize(int64_t blocksize, int64_t lo, int64_t hi, const char* op) {
  TORCH_CHECK_VALUE(blocksize >= lo && blocksize <= hi && (blocksize & (blocksize - 1)) == 0, op,
                    ": blocksize must be a power of two from ", lo, " to ", hi, "; got ", blocksize);
}

void check_nf4_quantize_args(const at::Tensor& w, int64_t blocksize) {
  const char* op = "lora_fused.nf4_quantize";
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat || w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16,
                   op, ": w must be bfloat16, float16 or float32; got a ", describe(w));
  check_blocksize(blocksize, 32, 4096, op);
}

void check_nf4_dequantize_args(const at::Tensor& packed, const at::Tensor& absmax,
                               const c10::optional<at::Tensor>& nested_absmax,
                               const c10::optional<at::Tensor>& nested_code, int64_t blocksize,
                               int64_t nested_blocksize, at::IntArrayRef shape, at::ScalarType dtype,
                               const char* op) {
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed must hold uint8 NF4 data; got a ", describe(packed));
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": the output dtype must be bfloat16, float16 or float32; got ", dtype);
  check_blocksize(blocksize, 32, 4096, op);
  int64_t n = 1;
  for (auto s : shape) {
    TORCH_CHECK_VALUE(s >= 0, op, ": shape must not be negative; got ", shape);
    n *= s;
  }
  TORCH_CHECK_VALUE(packed.numel() == (n + 1) / 2, op, ": a weight of shape ", shape, " (", n, " elements) packs into ",
                    (n + 1) / 2, " bytes; packed holds ", packed.numel(), " (", describe(packed), ")");
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  TORCH_CHECK_VALUE(absmax.dim() == 1 && absmax.numel() == blocks, op, ": ", n, " elements in blocks of ", blocksize,
                    " need absmax of ", blocks, " values; got a ", describe(absmax));
  TORCH_CHECK(absmax.device() == packed.device(), op, ": packed and absmax must be on the same device; got ",
              describe(packed), " and ", describe(absmax));
  const bool nested = absmax.scalar_type() == at::kByte;
  TORCH_CHECK_TYPE(nested || absmax.scalar_type() == at::kFloat, op,
                   ": absmax must be float32, or uint8 codes when double-quantized; got a ", describe(absmax));
  TORCH_CHECK_VALUE(nested == (nested_absmax.has_value() && nested_code.has_value()), op,
                    nested ? ": uint8 (double-quantized) absmax needs nested_absmax and nested_code"
                           : ": float32 absmax takes no nested_absmax/nested_code (those come with uint8 absmax)");
  if (nested) {
    TORCH_CHECK_VALUE(nested_blocksize >= 1, op, ": nested_blocksize must be positive; got ", nested_blocksize);
    const at::Tensor& na = *nested_absmax;
    const at::Tensor& nc = *nested_code;
    const int64_t nblocks2 = (blocks + nested_blocksize - 1) / nested_blocksize;
    TORCH_CHECK_TYPE(na.scalar_type() == at::kFloat && nc.scalar_type() == at::kFloat, op,
                     ": nested_absmax and nested_code must be float32; got ", describe(na), " and ", describe(nc));
    TORCH_CHECK_VALUE(na.dim() == 1 && na.numel() == nblocks2, op, ": ", blocks, " absmax codes in blocks of ",
                      nested_blocksize, " need nested_absmax of ", nblocks2, " values; got a ", describe(na));
    TORCH_CHECK_VALUE(nc.dim() == 1 && nc.numel() == 256, op, ": nested_code must hold 256 values; got a ", describe(nc));
    TORCH_CHECK(na.device() == packed.device() && nc.device() == packed.device(), op,
                ": nested_absmax and nested_code must be on packed's device; got ", describe(na), " and ", describe(nc));
  }
}

void check_blockwise_quantize_args(const at::Tensor& x, const at::Tensor& code, int64_t blocksize) {
  const char* op = "lora_fused.blockwise_quantize";
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, op, ": x must be float32; got a ", describe(x));
  TORCH_CHECK_TYPE(code.scalar_type() == at::kFloat && code.dim() == 1 && code.numel() == 256, op,
                   ": code must be a float32 tensor of 256 sorted values; got a ", describe(code));
  TORCH_CHECK(code.device() == x.device(), op, ": x and code must be on the same device; got ", describe(x), " and ",
              describe(code));
  check_blocksize(blocksize, 2, 4096, op);
}

namespace {

// The checks both NF4 matmul ops share. `other` is x [M, K] (forward) or grad_out [M, N] (grad).
Nf4Weight make_nf4_weight(const at::Tensor& other, bool grad, at::DeviceType device, const at::Tensor& packed,
                          const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
                          const c10::optional<at::Tensor>& nested_code, double offset, int64_t blocksize,
                          int64_t nested_blocksize, int64_t features, const char* op) {
  const char* name = grad ? "grad_out" : "x";
  check_device(other, device, op, name);
  TORCH_CHECK_VALUE(other.dim() == 2, op, ": ", name, " must be [M, ", grad ? "N" : "K", "]; got a ", describe(other));
  // The weight is [out_features, in_features]; the op names one and `other` gives the other.
  const int64_t out_features = grad ? other.size(1) : features;
  const int64_t in_features = grad ? features : other.size(1);
  const at::ScalarType t = other.scalar_type();
  TORCH_CHECK_TYPE(t == at::kBFloat16 || t == at::kHalf || t == at::kFloat, op, ": ", name,
                   " must be bfloat16, float16 or float32 (the weight is decoded to its dtype); got a ", describe(other));
  TORCH_CHECK_VALUE(out_features >= 1 && in_features >= 1, op, ": the weight must have at least one row and column; got [",
                    out_features, ", ", in_features, "]");
  check_nf4_dequantize_args(packed, absmax, nested_absmax, nested_code, blocksize, nested_blocksize,
                            {out_features, in_features}, t, op);
  TORCH_CHECK(packed.device() == other.device(), op, ": ", name, " and the NF4 weight must be on the same device; got ",
              describe(other), " and packed ", describe(packed));
  Nf4Weight w;
  w.packed = packed.contiguous();
  w.absmax = absmax.contiguous();
  if (nested_absmax.has_value()) w.nested_absmax = nested_absmax->contiguous();
  if (nested_code.has_value()) w.nested_code = nested_code->contiguous();
  w.offset = offset;
  w.blocksize = blocksize;
  w.nested_blocksize = nested_blocksize;
  w.out_features = out_features;
  w.in_features = in_features;
  return w;
}

}  // namespace

// The two LoRA operands an NF4 op takes together (forward: lora_u, lora_B; backward: lora_du,
// lora_A): both or neither, 2-D, on x's device in x's dtype. True when they are given.
static bool check_lora_pair(const at::Tensor& x, const char* x_name, const c10::optional<at::Tensor>& first,
                            const char* first_name, const c10::optional<at::Tensor>& second, const char* second_name,
                            const char* op) {
  TORCH_CHECK_VALUE(first.has_value() == second.has_value(), op, ": ", first_name, " and ", second_name,
                    " come together; got only ", first.has_value() ? first_name : second_name);
  if (!first.has_value()) return false;
  check_rank(*first, 2, op, first_name);
  check_rank(*second, 2, op, second_name);
  check_same(x, x_name, *first, first_name, op);
  check_same(x, x_name, *second, second_name, op);
  return true;
}

Nf4Weight check_nf4_linear_args(const at::Tensor& x, at::DeviceType device, const at::Tensor& packed,
                                const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
                                const c10::optional<at::Tensor>& nested_code, double offset, int64_t blocksize,
                                int64_t nested_blocksize, int64_t out_features, const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& lora_u, const c10::optional<at::Tensor>& lora_B,
                                const c10::optional<at::Tensor>& lora_A) {
  const char* op = "lora_fused.nf4_linear";
  Nf4Weight w = make_nf4_weight(x, false, device, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                nested_blocksize, out_features, op);
  const int64_t n = w.out_features;
  if (bias.has_value()) {
    check_same(x, "x", *bias, "bias", op);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, op, ": bias must have shape [", n, "]; got a ",
                      describe(*bias));
  }
  if (lora_A.has_value()) {
    TORCH_CHECK_VALUE(!lora_u.has_value(), op, ": give lora_u or lora_A (with lora_scale), not both");
    check_lora_pair(x, "x", lora_A, "lora_A", lora_B, "lora_B", op);
    const at::Tensor& a = *lora_A;
    const at::Tensor& b = *lora_B;
    TORCH_CHECK_VALUE(a.size(0) >= 1 && a.size(1) == x.size(1) && b.size(0) == n && b.size(1) == a.size(0), op,
                      ": expected x [M, k], lora_A [r, k], lora_B [", n, ", r] with r >= 1; got x ", x.sizes(),
                      ", lora_A ", a.sizes(), ", lora_B ", b.sizes());
  } else if (check_lora_pair(x, "x", lora_u, "lora_u", lora_B, "lora_B", op)) {
    const at::Tensor& u = *lora_u;
    const at::Tensor& b = *lora_B;
    TORCH_CHECK_VALUE(u.size(1) >= 1 && u.size(0) == x.size(0) && b.size(0) == n && b.size(1) == u.size(1), op,
                      ": expected x [M, k], lora_u [M, r], lora_B [", n, ", r] with r >= 1; got x ", x.sizes(),
                      ", lora_u ", u.sizes(), ", lora_B ", b.sizes());
  }
  return w;
}

Nf4Weight check_nf4_linear_grad_input_args(const at::Tensor& grad_out, at::DeviceType device, const at::Tensor& packed,
                                           const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
                                           const c10::optional<at::Tensor>& nested_code, double offset,
                                           int64_t blocksize, int64_t nested_blocksize, int64_t in_features,
                                           const c10::optional<at::Tensor>& lora_du,
                                           const c10::optional<at::Tensor>& lora_A,
                                           const c10::optional<at::Tensor>& lora_B) {
  const char* op = "lora_fused.nf4_linear_grad_input";
  Nf4Weight w = make_nf4_weight(grad_out, true, device, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                nested_blocksize, in_features, op);
  if (lora_B.has_value()) {
    check_lora_pair(grad_out, "grad_out", lora_B, "lora_B", lora_A, "lora_A", op);
    const at::Tensor& b = *lora_B;
    const at::Tensor& a = *lora_A;
    TORCH_CHECK_VALUE(b.size(1) >= 1 && b.size(0) == grad_out.size(1) && a.size(0) == b.size(1) &&
                          a.size(1) == in_features,
                      op, ": expected grad_out [M, n], lora_B [n, r], lora_A [r, ", in_features,
                      "] with r >= 1; got grad_out ", grad_out.sizes(), ", lora_B ", b.sizes(), ", lora_A ",
                      a.sizes());
  }
  if (lora_du.has_value() || !lora_B.has_value()) {
    check_lora_pair(grad_out, "grad_out", lora_du, "lora_du", lora_A, "lora_A", op);
  }
  if (lora_du.has_value()) {
    const at::Tensor& du = *lora_du;
    const at::Tensor& a = *lora_A;
    TORCH_CHECK_VALUE(du.size(1) >= 1 && du.size(0) == grad_out.size(0) && a.size(0) == du.size(1) &&
                          a.size(1) == in_features,
                      op, ": expected grad_out [M, n], lora_du [M, r], lora_A [r, ", in_features,
                      "] with r >= 1; got grad_out ", grad_out.sizes(), ", lora_du ", du.sizes(), ", lora_A ",
                      a.sizes());
  }
  return w;
}

}  // namespace lora_fused
