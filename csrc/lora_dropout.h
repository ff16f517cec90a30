// lora_dropout: out = x * keep / (1 - p), keep = philox_uniform(seed, i) >= p for the element of
// logical (row-major) index i of x [M, K], whatever x's strides. The mask is a pure function of
// (seed, shape), so a layer's backward regenerates it rather than storing it, and CPU and CUDA agree.
#pragma once
#include <ATen/ATen.h>

namespace lora_fused {

void check_lora_dropout_args(const at::Tensor& x, double p, const at::Tensor& seed, at::DeviceType device);

}  // namespace lora_fused
