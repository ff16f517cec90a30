// 8-bit blockwise quantization to the nearest entry of a sorted 256-value code (NF4's double
// quantization of absmax): scaled = x * (1 / absmax(block)), code index = number of fp32
// midpoints strictly below it (ties to the lower entry).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "checks.h"
#include "nf4_format.h"

namespace lora_fused {

std::tuple<at::Tensor, at::Tensor> blockwise_quantize_cpu(const at::Tensor& x, const at::Tensor& code,
                                                          int64_t blocksize) {
  check_blockwise_quantize_args(x, code, blocksize);
  check_device(x, at::kCPU, "lora_fused.blockwise_quantize", "x");
  const at::Tensor xf = x.contiguous().view(-1);
  const at::Tensor cf = code.contiguous();
  const int64_t n = xf.numel();
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, x.options().dtype(at::kFloat));
  float mid[255];
  for (int i = 0; i < 255; ++i) mid[i] = 0.5f * (cf.data_ptr<float>()[i] + cf.data_ptr<float>()[i + 1]);
  const float* src = xf.data_ptr<float>();
  uint8_t* dst = q.data_ptr<uint8_t>();
  float* am = absmax.data_ptr<float>();
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize, end = std::min(start + blocksize, n);
      float amax = 0.0f;
      for (int64_t i = start; i < end; ++i) amax = std::max(amax, std::fabs(src[i]));
      am[b] = amax;
      const float inv = nf4::inverse_absmax(amax);
      for (int64_t i = start; i < end; ++i) {
        const float s = std::min(1.0f, std::max(-1.0f, src[i] * inv));
        dst[i] = static_cast<uint8_t>(std::lower_bound(mid, mid + 255, s) - mid);
      }
    }
  });
  return {q, absmax};
}

TORCH_LIBRARY_IMPL(lora_fused, CPU, m) { m.impl("blockwise_quantize", &blockwise_quantize_cpu); }

}  // namespace lora_fused
