// Two packed 16-bit floats (bf16 or fp16; the low half is the first element) as two fp32 values.
#pragma once
#include <ATen/ATen.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace lora_fused {
namespace cuda {

__device__ __forceinline__ float2 unpack2(uint32_t v, at::BFloat16) {
  return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}
__device__ __forceinline__ float2 unpack2(uint32_t v, at::Half) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}

}  // namespace cuda
}  // namespace lora_fused
