// NF4 dequantization on CPU. The double-quantized absmax decodes as bitsandbytes does:
// (nested_code[q] * nested_absmax) rounded to fp32, then + offset rounded to fp32 (built with
// -ffp-contract=off so no fused multiply-add changes the rounding).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "nf4_format.h"

namespace lora_fused {

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                              const c10::optional<at::Tensor>& nested_absmax,
                              const c10::optional<at::Tensor>& nested_code, double offset, int64_t blocksize,
                              int64_t nested_blocksize, at::IntArrayRef shape, at::ScalarType dtype) {
  check_nf4_dequantize_args(packed, absmax, nested_absmax, nested_code, blocksize, nested_blocksize, shape, dtype);
  check_device(packed, at::kCPU, "lora_fused.nf4_dequantize", "packed");
  int64_t n = 1;
  for (auto s : shape) n *= s;
  const int64_t blocks = absmax.numel();
  // Decode the block scales once (a few per thousand elements), then the nibbles.
  at::Tensor scales = at::empty({blocks}, absmax.options().dtype(at::kFloat));
  float* sc = scales.data_ptr<float>();
  if (absmax.scalar_type() == at::kByte) {
    const at::Tensor q = absmax.contiguous();
    const at::Tensor a2 = nested_absmax->contiguous();
    const at::Tensor c2 = nested_code->contiguous();
    const uint8_t* qp = q.data_ptr<uint8_t>();
    const float* a2p = a2.data_ptr<float>();
    const float* c2p = c2.data_ptr<float>();
    const float off = static_cast<float>(offset);
    for (int64_t b = 0; b < blocks; ++b) {
      const float prod = c2p[qp[b]] * a2p[b / nested_blocksize];
      sc[b] = prod + off;
    }
  } else {
    scales.copy_(absmax);
  }
  const at::Tensor src = packed.contiguous();
  const uint8_t* bytes = src.data_ptr<uint8_t>();
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nf4_dequantize_cpu", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, (n + 1) / 2, 4096, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t e = 2 * j;
        const float s = sc[e / blocksize];
        dst[e] = static_cast<scalar_t>(nf4::level(bytes[j] >> 4) * s);
        if (e + 1 < n) dst[e + 1] = static_cast<scalar_t>(nf4::level(bytes[j] & 15) * s);
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(lora_fused, CPU, m) { m.impl("nf4_dequantize", &nf4_dequantize_cpu); }

}  // namespace lora_fused
