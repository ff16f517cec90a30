// The one list of lora_fused ops: every schema is declared here, once. Each backend registers its
// implementation beside its kernels (csrc/cpu/*.cpp, csrc/cuda/*.cu); Python adds fake kernels and
// autograd (lora_fused/_ops.py, lora_fused/_autograd.py).
#include <Python.h>
#include <torch/library.h>

#ifndef LORA_FUSED_VERSION
#define LORA_FUSED_VERSION "unknown"
#endif
#ifndef LORA_FUSED_TORCH_VERSION
#define LORA_FUSED_TORCH_VERSION "unknown"
#endif
#ifdef LORA_FUSED_WITH_CUDA
#include <cuda.h>  // CUDA_VERSION
#define LF_STR2(x) #x
#define LF_STR(x) LF_STR2(x)
#define LF_CUDA_VERSION LF_STR(CUDA_VERSION)
#else
#define LF_CUDA_VERSION ""
#define LORA_FUSED_ARCH_LIST ""
#endif

TORCH_LIBRARY(lora_fused, m) {
  // u = scale * x @ lora_A^T.  x: [M, k], lora_A: [r, k] -> u: [M, r] in x's dtype (fp32 accumulation).
  m.def("lora_shrink(Tensor x, Tensor lora_A, float scale=1.0) -> Tensor");
  // out = y + scale * u @ lora_B^T.  y: [M, d], u: [M, r], lora_B: [d, r] -> out: [M, d] in y's dtype.
  m.def("lora_expand(Tensor y, Tensor u, Tensor lora_B, float scale=1.0) -> Tensor");
  // out = x @ weight^T + scale * (x @ lora_A^T) @ lora_B^T + bias, no autograd (inference). CUDA: a fused
  // kernel streaming the weight once for M <= 16 (bf16/fp16), the composed cuBLAS path otherwise.
  m.def("lora_decode(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, float scale, Tensor? bias=None) -> Tensor");
  // out = a @ b^T + a2 @ b2^T + bias: one GEMM over the concatenated K, [a | a2] @ [b | b2]^T, without
  // building the concatenation. a [M, K1], b [N, K1], a2 [M, K2], b2 [N, K2], bias [N] -> [M, N]. Two ATen
  // GEMMs (beta = 1); on Hopper (bf16/fp16, 16-byte aligned) one CUTLASS kernel when LORA_FUSED_GEMM_CONCAT_K asks.
  m.def("gemm_concat_k(Tensor a, Tensor b, Tensor a2, Tensor b2, Tensor? bias=None) -> Tensor");
  // Dropout whose mask is a pure function of (seed, element index): Philox4x32-10, keep where the
  // element's uniform >= p, kept values scaled by 1 / (1 - p). x: [M, K]; seed: int64 [1] on x's device.
  m.def("lora_dropout(Tensor x, float p, Tensor seed) -> Tensor");
  // The LoRA branch's backward (y = ... + scale * (x @ lora_A^T) @ lora_B^T): grad_out [M, N], x [M, K]
  // (dropout applied), lora_A [r, K], lora_B [N, r] -> (du = scale * grad_out @ lora_B [M, r],
  // dA = du^T @ x [r, K], dB = grad_out^T @ u [N, r]) with u = scale * x @ lora_A^T unless given; a
  // gradient not needed comes back with 0 rows. In grad_out's dtype, fp32 accumulation.
  m.def(
      "lora_adapter_grads(Tensor grad_out, Tensor x, Tensor lora_A, Tensor lora_B, float scale, Tensor? u=None, "
      "bool need_A=True, bool need_B=True) -> (Tensor, Tensor, Tensor)");
  // NF4 (bitsandbytes layout): w (any shape, fp32/fp16/bf16) -> (packed uint8 [(n+1)//2, 1], absmax fp32 [blocks]).
  m.def("nf4_quantize(Tensor w, int blocksize) -> (Tensor, Tensor)");
  // Inverse of nf4_quantize. absmax is fp32 [blocks], or uint8 codes [blocks] when double-quantized, in which
  // case absmax_i = nested_code[absmax[i]] * nested_absmax[i // nested_blocksize] + offset.
  m.def(
      "nf4_dequantize(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float offset, "
      "int blocksize, int nested_blocksize, int[] shape, ScalarType dtype) -> Tensor");
  // 8-bit blockwise quantization to the nearest entry of a sorted 256-entry code (double quantization of
  // NF4's absmax): x fp32 [n] -> (codes uint8 [n], absmax fp32 [ceil(n / blocksize)]).
  m.def("blockwise_quantize(Tensor x, Tensor code, int blocksize) -> (Tensor, Tensor)");
  // out = x @ W^T + bias + lora_u @ lora_B^T with W [out_features, K] the NF4 weight (arguments as
  // nf4_dequantize's; K = x.shape[1]) decoded to x's dtype on the fly, never as a whole 16-bit copy.
  // x: [M, K] bf16/fp16/fp32; bias: [N]; lora_u: [M, r] (already scaled), lora_B: [N, r]. Or, in
  // place of lora_u, lora_A [r, K] and lora_scale: u = lora_scale * x @ lora_A^T is computed by the op
  // (inside the decode kernel where it can: qlora_linear's inference path), or, on the slab path with
  // M >= 2048 (LORA_FUSED_NF4_MERGE, nf4_linear.h), lora_scale * lora_B @ lora_A is added to each decoded slab of W, no u made.
  m.def(
      "nf4_linear(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float offset, "
      "int blocksize, int nested_blocksize, int out_features, Tensor? bias=None, Tensor? lora_u=None, "
      "Tensor? lora_B=None, Tensor? lora_A=None, float lora_scale=1.0) -> Tensor");
  // nf4_linear with lora_A (no lora_u) that also returns u = lora_scale * x @ lora_A^T [M, r], which
  // qlora_linear's backward needs for dB = grad_out^T u: merged on the slab path, u comes from the first
  // slab's GEMM (nf4_linear.h) instead of a GEMM of its own in the backward.
  m.def(
      "nf4_linear_with_u(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "float offset, int blocksize, int nested_blocksize, int out_features, Tensor? bias, Tensor lora_B, "
      "Tensor lora_A, float lora_scale) -> (Tensor, Tensor)");
  // grad_x = grad_out @ W + lora_du @ lora_A for nf4_linear's / qlora_linear's backward: grad_out [M, N],
  // lora_du [M, r], lora_A [r, in_features] -> [M, in_features]; the LoRA term is the GEMMs' accumulator.
  // Or, with lora_B [N, r] and lora_scale, lora_du = lora_scale * grad_out @ lora_B: then the op may merge
  // lora_scale * lora_B @ lora_A into each decoded slab of W instead (given lora_du too, it picks).
  m.def(
      "nf4_linear_grad_input(Tensor grad_out, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_code, float offset, int blocksize, int nested_blocksize, int in_features, "
      "Tensor? lora_du=None, Tensor? lora_A=None, Tensor? lora_B=None, float lora_scale=1.0) -> Tensor");
}

// `import lora_fused._C` loads this library, which runs the registrations above; the module itself
// only carries what the build was.
static PyModuleDef lora_fused_module = {PyModuleDef_HEAD_INIT, "_C", "lora_fused compiled ops", -1, nullptr};

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&lora_fused_module);
  if (m == nullptr) return nullptr;
#ifdef LORA_FUSED_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
#if LORA_FUSED_WITH_SM90
  PyModule_AddIntConstant(m, "WITH_SM90", 1);
#else
  PyModule_AddIntConstant(m, "WITH_SM90", 0);
#endif
  PyModule_AddStringConstant(m, "VERSION", LORA_FUSED_VERSION);
  PyModule_AddStringConstant(m, "TORCH_VERSION", LORA_FUSED_TORCH_VERSION);
  PyModule_AddStringConstant(m, "CUDA_VERSION", LF_CUDA_VERSION);
  PyModule_AddStringConstant(m, "CUDA_ARCH_LIST", LORA_FUSED_ARCH_LIST);
  return m;
}
