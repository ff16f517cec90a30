// lora_dropout on CPU: the same Philox stream as the CUDA kernel, element by element.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "lora_dropout.h"
#include "philox.h"

namespace lora_fused {

void check_lora_dropout_args(const at::Tensor& x, double p, const at::Tensor& seed, at::DeviceType device) {
  const char* op = "lora_fused.lora_dropout";
  check_lora_dtype(x, op, "x");
  check_rank(x, 2, op, "x");
  check_device(x, device, op, "x");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1); got ", p);
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong && seed.numel() == 1, op,
                   ": seed must be a one-element int64 tensor; got a ", describe(seed));
  TORCH_CHECK(seed.device() == x.device(), op, ": seed must be on x's device; got ", describe(seed), " and ", describe(x));
}

at::Tensor lora_dropout_cpu(const at::Tensor& x, double p, const at::Tensor& seed) {
  check_lora_dropout_args(x, p, seed, at::kCPU);
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t cols = x.size(1), n = x.numel();
  const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());
  const float keep_p = static_cast<float>(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // double for double, else float
    const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
    const auto xa = x.accessor<scalar_t, 2>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, (n + 3) / 4, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const Philox4 r = philox4x32_10(static_cast<uint64_t>(g), key);
        for (int j = 0; j < 4 && 4 * g + j < n; ++j) {
          const int64_t i = 4 * g + j;
          const bool keep = philox_uniform(r.v[j]) >= keep_p;
          o[i] = keep ? static_cast<scalar_t>(static_cast<acc_t>(xa[i / cols][i % cols]) * scale) : scalar_t(0);
        }
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(lora_fused, CPU, m) { m.impl("lora_dropout", &lora_dropout_cpu); }

}  // namespace lora_fused
