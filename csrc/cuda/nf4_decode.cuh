// Device-side NF4 decoding shared by the CUDA kernels: the per-block scale (plain fp32, or the
// double-quantized 8-bit code decoded in place, rounding as bitsandbytes does: mul, then add, with
// --fmad=false) and the 8-element decode-and-store used by the dequantizers.
#pragma once
#include <cstdint>

#include "nf4_format.h"
#include "nf4_linear.h"

namespace lora_fused {
namespace cuda {

struct BlockScales {
  const float* absmax;         // fp32 scales, or nullptr when double-quantized
  const uint8_t* codes;        // double-quantized: 8-bit code per block
  const float* nested_absmax;  // one per nested_blocksize codes
  const float* nested_code;    // 256 entries
  int64_t nested_blocksize;
  int nested_shift;            // log2(nested_blocksize) when a power of two (bitsandbytes: 256), else -1
  float offset;

  __device__ __forceinline__ float operator()(int64_t block) const {
    if (absmax != nullptr) return absmax[block];
    const int64_t b2 = nested_shift >= 0 ? block >> nested_shift : block / nested_blocksize;
    return __fadd_rn(__fmul_rn(__ldg(nested_code + codes[block]), __ldg(nested_absmax + b2)), offset);
  }

  // The same scale in two steps, for the streaming decoders: load() issues the global loads (the
  // fp32 scale, or the 8-bit code and its nested absmax: independent, so they fly beside the weight
  // loads), finish() looks the code up in a shared-memory copy of the nested code table (made by
  // load_code), so no global load waits on another.
  struct Parts {
    float value;  // the fp32 scale, or the nested absmax
    uint32_t code;
  };
  __device__ __forceinline__ Parts load(int64_t block) const {
    if (absmax != nullptr) return {__ldg(absmax + block), 0u};
    const int64_t b2 = nested_shift >= 0 ? block >> nested_shift : block / nested_blocksize;
    return {__ldg(nested_absmax + b2), __ldg(codes + block)};
  }
  __device__ __forceinline__ float finish(const Parts& p, const float* code_smem) const {
    return absmax != nullptr ? p.value : __fadd_rn(__fmul_rn(code_smem[p.code], p.value), offset);
  }
  // Copies the 256-entry nested code table to `code_smem` (no-op for fp32 scales); the caller
  // synchronises the block before finish().
  __device__ __forceinline__ void load_code(float* code_smem) const {
    if (absmax != nullptr) return;
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code_smem[i] = __ldg(nested_code + i);
  }
};

inline int log2_exact(int64_t v) {
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

// Host side: the scales of absmax (fp32, or uint8 codes with the nested tensors).
inline BlockScales make_block_scales(const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
                                     const c10::optional<at::Tensor>& nested_code, double offset,
                                     int64_t nested_blocksize) {
  BlockScales s{nullptr, nullptr, nullptr, nullptr, 1, 0, static_cast<float>(offset)};
  if (absmax.scalar_type() == at::kByte) {
    s.codes = absmax.data_ptr<uint8_t>();
    s.nested_absmax = nested_absmax->data_ptr<float>();
    s.nested_code = nested_code->data_ptr<float>();
    s.nested_blocksize = nested_blocksize;
    s.nested_shift = log2_exact(nested_blocksize);
  } else {
    s.absmax = absmax.data_ptr<float>();
  }
  return s;
}

inline BlockScales make_block_scales(const Nf4Weight& w) {
  return make_block_scales(w.absmax, w.nested_absmax, w.nested_code, w.offset, w.nested_blocksize);
}

// Decodes the 8 elements of 4 packed bytes (little-endian `word`, element 2j in byte j's high
// nibble) with scale s and stores them as one 16-byte (bf16/fp16) or two (fp32) vectors.
template <typename out_t>
__device__ __forceinline__ void store8(out_t* dst, const uint32_t word, const float s, const float* levels) {
  alignas(16) out_t v[8];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t b = (word >> (8 * j)) & 0xffu;
    v[2 * j] = static_cast<out_t>(levels[b >> 4] * s);
    v[2 * j + 1] = static_cast<out_t>(levels[b & 15] * s);
  }
#pragma unroll
  for (int q = 0; q < static_cast<int>(sizeof(v) / 16); ++q)
    reinterpret_cast<uint4*>(dst)[q] = reinterpret_cast<const uint4*>(v)[q];
}

}  // namespace cuda

// Launchers used by nf4_linear's CUDA implementation (csrc/cuda/nf4_linear.cu); spare_rows as in
// DequantRect (nf4_linear.h).
at::Tensor nf4_dequantize_rect_cuda(const Nf4Weight& w, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                                    at::ScalarType dtype, int64_t spare_rows = 0);
// The same with lora_scale * lora_B @ lora_A added (nf4_dequantize_rect_lora.cu): bf16/fp16 adapters,
// r <= 128, cols a multiple of 64, sm_80+; an undefined tensor otherwise.
at::Tensor nf4_dequantize_rect_lora_cuda(const Nf4Weight& w, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                                         const at::Tensor& lora_B, const at::Tensor& lora_A, double lora_scale,
                                         int64_t spare_rows = 0);
// The small-M kernel: false (and nothing launched) when the shapes/dtypes are outside what it takes.
// The LoRA term: lora_u @ lora_B^T, or with lora_A (and no lora_u) u = lora_scale * x @ lora_A^T
// first (where the block-aligned kernel applies, by a small kernel that it overlaps).
bool nf4_gemv_cuda(const at::Tensor& x, const Nf4Weight& w, const c10::optional<at::Tensor>& bias,
                   const c10::optional<at::Tensor>& lora_u, const c10::optional<at::Tensor>& lora_B,
                   const c10::optional<at::Tensor>& lora_A, double lora_scale, at::Tensor& out);

}  // namespace lora_fused
