// nf4_linear and nf4_linear_grad_input on CPU: the tiled path (nf4_linear_tiled.cpp) over a plain
// decoder of a rectangle of the weight. Scales decode as nf4_dequantize decodes them, so a slab
// holds exactly the values nf4_dequantize gives.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "nf4_format.h"
#include "nf4_linear.h"

namespace lora_fused {
namespace {

at::Tensor nf4_dequantize_rect_cpu(const Nf4Weight& w, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                                   at::ScalarType dtype, int64_t spare_rows) {
  const int64_t k = w.in_features, bs = w.blocksize;
  const uint8_t* bytes = w.packed.data_ptr<uint8_t>();
  const bool nested = w.absmax.scalar_type() == at::kByte;
  const float* absmax = nested ? nullptr : w.absmax.data_ptr<float>();
  const uint8_t* codes = nested ? w.absmax.data_ptr<uint8_t>() : nullptr;
  const float* a2 = nested ? w.nested_absmax->data_ptr<float>() : nullptr;
  const float* c2 = nested ? w.nested_code->data_ptr<float>() : nullptr;
  const int64_t nbs = w.nested_blocksize;
  const float off = static_cast<float>(w.offset);
  at::Tensor out = at::empty({rows + spare_rows, cols}, w.packed.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nf4_dequantize_rect_cpu", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        int64_t block = -1;
        float s = 0.0f;
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t f = (row0 + r) * k + col0 + c;
          if (f / bs != block) {
            block = f / bs;
            if (nested) {
              const float prod = c2[codes[block]] * a2[block / nbs];
              s = prod + off;
            } else {
              s = absmax[block];
            }
          }
          const uint8_t b = bytes[f >> 1];
          dst[r * cols + c] = static_cast<scalar_t>(nf4::level((f & 1) ? (b & 15) : (b >> 4)) * s);
        }
      }
    });
  });
  return out;
}

at::Tensor nf4_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                          double offset, int64_t blocksize, int64_t nested_blocksize, int64_t out_features,
                          const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& lora_u,
                          const c10::optional<at::Tensor>& lora_B, const c10::optional<at::Tensor>& lora_A,
                          double lora_scale) {
  const Nf4Weight w = check_nf4_linear_args(x, at::kCPU, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                            nested_blocksize, out_features, bias, lora_u, lora_B, lora_A);
  return nf4_linear_tiled(x, w, bias, lora_u, lora_B, lora_A, lora_scale, nf4_dequantize_rect_cpu);
}

std::tuple<at::Tensor, at::Tensor> nf4_linear_with_u_cpu(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code, double offset,
    int64_t blocksize, int64_t nested_blocksize, int64_t out_features, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_B, const at::Tensor& lora_A, double lora_scale) {
  const Nf4Weight w = check_nf4_linear_args(x, at::kCPU, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                            nested_blocksize, out_features, bias, c10::nullopt, lora_B, lora_A);
  at::Tensor u;
  at::Tensor out = nf4_linear_tiled(x, w, bias, c10::nullopt, lora_B, lora_A, lora_scale, nf4_dequantize_rect_cpu,
                                    nullptr, &u);
  return {out, u};
}

at::Tensor nf4_linear_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
                                     const c10::optional<at::Tensor>& nested_absmax,
                                     const c10::optional<at::Tensor>& nested_code, double offset, int64_t blocksize,
                                     int64_t nested_blocksize, int64_t in_features,
                                     const c10::optional<at::Tensor>& lora_du, const c10::optional<at::Tensor>& lora_A,
                                     const c10::optional<at::Tensor>& lora_B, double lora_scale) {
  const Nf4Weight w = check_nf4_linear_grad_input_args(grad_out, at::kCPU, packed, absmax, nested_absmax, nested_code,
                                                       offset, blocksize, nested_blocksize, in_features, lora_du,
                                                       lora_A, lora_B);
  return nf4_linear_grad_input_tiled(grad_out, w, lora_du, lora_A, lora_B, lora_scale, nf4_dequantize_rect_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_fused, CPU, m) {
  m.impl("nf4_linear", &nf4_linear_cpu);
  m.impl("nf4_linear_with_u", &nf4_linear_with_u_cpu);
  m.impl("nf4_linear_grad_input", &nf4_linear_grad_input_cpu);
}

}  // namespace lora_fused
