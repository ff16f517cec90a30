// NF4 quantization on CPU, one quantization block per task (the format is in nf4_format.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "checks.h"
#include "nf4_format.h"

namespace lora_fused {

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cpu(const at::Tensor& w, int64_t blocksize) {
  check_nf4_quantize_args(w, blocksize);
  check_device(w, at::kCPU, "lora_fused.nf4_quantize", "w");
  const at::Tensor wf = w.contiguous().view(-1).to(at::kFloat);
  const int64_t n = wf.numel();
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, w.options().dtype(at::kFloat));
  const float* src = wf.data_ptr<float>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  float* amax_out = absmax.data_ptr<float>();
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize, end = std::min(start + blocksize, n);
      float amax = 0.0f;
      for (int64_t i = start; i < end; ++i) amax = std::max(amax, std::fabs(src[i]));
      amax_out[b] = amax;
      const float inv = nf4::inverse_absmax(amax);
      // start is even (blocksize is), so a byte never straddles two blocks.
      for (int64_t i = start; i < end; i += 2) {
        const int hi = nf4::quantize_scaled(src[i] * inv);
        const int lo = i + 1 < n ? nf4::quantize_scaled(src[i + 1] * inv) : nf4::kPadNibble;
        dst[i / 2] = static_cast<uint8_t>((hi << 4) | lo);
      }
    }
  });
  return {packed, absmax};
}

TORCH_LIBRARY_IMPL(lora_fused, CPU, m) { m.impl("nf4_quantize", &nf4_quantize_cpu); }

}  // namespace lora_fused
