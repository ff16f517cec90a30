// Host declarations shared by the CPU and CUDA implementations of nf4_linear and
// nf4_linear_grad_input: the NF4 weight as the ops receive it, and the tiled path that decodes a
// bounded slab of the weight at a time and multiplies it with the backend's GEMM.
#pragma once
#include <ATen/ATen.h>

#include <functional>

namespace lora_fused {

// An NF4 weight [out_features, in_features] in bitsandbytes' layout (see nf4_format.h).
struct Nf4Weight {
  at::Tensor packed;  // uint8, (N*K + 1) / 2 bytes, contiguous
  at::Tensor absmax;  // fp32 [blocks], or uint8 codes [blocks] when double-quantized
  c10::optional<at::Tensor> nested_absmax, nested_code;
  double offset = 0.0;
  int64_t blocksize = 64, nested_blocksize = 256;
  int64_t out_features = 0, in_features = 0;  // N, K
};

// Check what the ops receive (device, ranks, dtypes, shapes, the NF4 state; for nf4_linear also
// bias [N] and lora_u [M, r] or lora_A [r, K] with lora_B [N, r]; for the gradient lora_A [r, K]
// with lora_du [M, r] and/or lora_B [N, r]) and return the weight with contiguous tensors.
Nf4Weight check_nf4_linear_args(const at::Tensor& x, at::DeviceType device, const at::Tensor& packed,
                                const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
                                const c10::optional<at::Tensor>& nested_code, double offset, int64_t blocksize,
                                int64_t nested_blocksize, int64_t out_features, const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& lora_u, const c10::optional<at::Tensor>& lora_B,
                                const c10::optional<at::Tensor>& lora_A);

// u = scale * x @ lora_A^T in x's dtype (as the layers' shrink: mm, then the scale in place), for
// nf4_linear called with lora_A where its kernel does not compute u itself.
at::Tensor nf4_lora_u(const at::Tensor& x, const at::Tensor& lora_A, double scale);
Nf4Weight check_nf4_linear_grad_input_args(const at::Tensor& grad_out, at::DeviceType device, const at::Tensor& packed,
                                           const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
                                           const c10::optional<at::Tensor>& nested_code, double offset,
                                           int64_t blocksize, int64_t nested_blocksize, int64_t in_features,
                                           const c10::optional<at::Tensor>& lora_du,
                                           const c10::optional<at::Tensor>& lora_A,
                                           const c10::optional<at::Tensor>& lora_B);

// Where the slab path puts the LoRA term: into the decoded slabs (W + s B A, added as each slab is
// decoded; forward x (W + s B A)^T, backward dY (W + s B A)) or beside the slab GEMMs (an [M, N] or
// [M, K] term they accumulate onto with beta = 1). LORA_FUSED_NF4_MERGE: unset (kAuto) merges by the
// merging decode kernel where it applies and M >= kNf4MergeMinRows (H200, 4096->11008, M = 4096,
// interleaved: 1264 us fwd+bwd merged against 1319 beside, benchmarks/RESULTS.md session 16; below
// that the kernel's extra ~6 us per slab outweighs the [M, slab] term it saves), beside elsewhere;
// 0 never merges; 1 always (the kernel, or a decode and a GEMM where it does not apply); gemm always
// by a decode and a GEMM.
enum class Nf4Merge { kAuto, kNever, kKernel, kGemm };
Nf4Merge nf4_merge_mode();
constexpr int64_t kNf4MergeMinRows = 2048;

// Decodes rows [row0, row0 + rows) x columns [col0, col0 + cols) of the weight into the first rows of
// a new contiguous [rows + spare_rows, cols] tensor of `dtype` on the weight's device (the spare rows
// are left for the caller to fill).
using DequantRect = std::function<at::Tensor(const Nf4Weight&, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                                             at::ScalarType dtype, int64_t spare_rows)>;
// Decodes a rectangle as DequantRect and adds lora_scale * lora_B @ lora_A ([rows, r] @ [r, cols]: the
// rectangle's slices of the adapters) in the same pass, in x's dtype; returns an undefined tensor
// where it does not apply (the tiled path then decodes and adds the product with a GEMM).
using DequantRectLora = std::function<at::Tensor(const Nf4Weight&, int64_t row0, int64_t rows, int64_t col0,
                                                 int64_t cols, const at::Tensor& lora_B, const at::Tensor& lora_A,
                                                 double lora_scale, int64_t spare_rows)>;

// Elements of 16-bit weight a tiled call decodes at once: N*K/4 clamped to [2^22, 2^24] (8 to 32 MiB
// in bf16), unless LORA_FUSED_NF4_SLAB_ELEMS says otherwise (tests use it to force many slabs).
// Measured on an H100 at M = 4096 (benchmarks/RESULTS.md): 2^24 slabs ran forward at 0.92-0.96x
// the bf16 cuBLAS time, 2^20 slabs at 0.38-0.55x (skinny GEMMs, many launches).
int64_t nf4_slab_elems(int64_t n, int64_t k);

// out = x @ W^T + bias + lora_u @ lora_B^T, one slab of rows of W at a time: each slab's GEMM writes
// its column block of out, accumulating onto the bias/LoRA term where there is one (beta = 1). With
// lora_A (and no lora_u), out = x @ (W + lora_scale * lora_B @ lora_A)^T + bias: the LoRA term is
// added to each decoded slab before its GEMM. Given u_out (with lora_A, no lora_u), it also returns
// u = lora_scale * x @ lora_A^T there for the backward: the u the path made, or, merged, from the first
// slab's GEMM with lora_A as extra rows of the slab (its output columns are the next slab's until that
// GEMM runs), or one more GEMM where that does not fit (a bias, one slab).
at::Tensor nf4_linear_tiled(const at::Tensor& x, const Nf4Weight& w, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& lora_u, const c10::optional<at::Tensor>& lora_B,
                            const c10::optional<at::Tensor>& lora_A, double lora_scale, const DequantRect& dequant,
                            const DequantRectLora& dequant_lora = nullptr, at::Tensor* u_out = nullptr);

// grad_x = grad_out @ W + lora_du @ lora_A, one slab of columns of W at a time: each slab's GEMM
// writes its column block of grad_x, or accumulates onto the LoRA term there (beta = 1). With lora_B
// (and no lora_du), grad_x = grad_out @ (W + lora_scale * lora_B @ lora_A), merged per slab.
at::Tensor nf4_linear_grad_input_tiled(const at::Tensor& grad_out, const Nf4Weight& w,
                                       const c10::optional<at::Tensor>& lora_du,
                                       const c10::optional<at::Tensor>& lora_A,
                                       const c10::optional<at::Tensor>& lora_B, double lora_scale,
                                       const DequantRect& dequant, const DequantRectLora& dequant_lora = nullptr);

}  // namespace lora_fused
