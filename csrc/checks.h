// Argument checks shared by the CPU and CUDA implementations: each says what was given and what
// is supported. TORCH_CHECK_TYPE raises TypeError, TORCH_CHECK_VALUE ValueError, TORCH_CHECK
// RuntimeError. Defined once, in checks.cpp: .cu files are host-compiled by nvcc's -ccbin compiler,
// which may differ from the one compiling .cpp files, and must not carry copies of these.
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace lora_fused {

std::string describe(const at::Tensor& t);

bool is_lora_dtype(at::ScalarType t);

void check_lora_dtype(const at::Tensor& t, const char* op, const char* name);

void check_rank(const at::Tensor& t, int64_t rank, const char* op, const char* name);

void check_same(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb, const char* op);

void check_device(const at::Tensor& t, at::DeviceType want, const char* op, const char* name);

// x: [M, k], lora_A: [r, k], r >= 1.
void check_lora_shrink_args(const at::Tensor& x, const at::Tensor& a);

// y: [M, d], u: [M, r], lora_B: [d, r], r >= 1.
void check_lora_expand_args(const at::Tensor& y, const at::Tensor& u, const at::Tensor& b);

// grad_out: [M, N], x: [M, K], lora_A: [r, K], lora_B: [N, r], u: [M, r] or none; one dtype and device.
void check_lora_adapter_grads_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& lora_A,
                                   const at::Tensor& lora_B, const c10::optional<at::Tensor>& u);

// x: [M, k], weight: [d, k], lora_A: [r, k], lora_B: [d, r], bias: [d] or none; one dtype and device.
void check_lora_linear_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b,
                            const c10::optional<at::Tensor>& bias, const char* op);

void check_blocksize(int64_t blocksize, int64_t lo, int64_t hi, const char* op);

void check_nf4_quantize_args(const at::Tensor& w, int64_t blocksize);

void check_nf4_dequantize_args(const at::Tensor& packed, const at::Tensor& absmax,
                               const c10::optional<at::Tensor>& nested_absmax,
                               const c10::optional<at::Tensor>& nested_code, int64_t blocksize,
                               int64_t nested_blocksize, at::IntArrayRef shape, at::ScalarType dtype,
                               const char* op = "lora_fused.nf4_dequantize");

void check_blockwise_quantize_args(const at::Tensor& x, const at::Tensor& code, int64_t blocksize);

}  // namespace lora_fused
