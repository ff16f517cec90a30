// NF4 dequantization on CUDA. Each thread decodes one 16-byte chunk (32 elements) with one 16-byte
// load and 16-byte stores; 32 elements never straddle a quantization block (blocksize >= 32 is a
// multiple of 32), so each thread decodes one block scale. (8-byte chunks reached 1.9-2.4 TB/s of
// 3.0 on an H100; 16-byte chunks put twice the bytes in flight per thread.) The double-quantized scale is decoded
// in place, never in a separate pass, rounding as bitsandbytes does (mul, then add; --fmad=false).
// The last, partial chunk and misaligned inputs take the per-byte path.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/common.cuh"
#include "nf4_format.h"

namespace lora_fused {
namespace {

constexpr int kThreads = 256;
constexpr int kBytes = 16;  // packed bytes per thread

struct BlockScales {
  const float* absmax;          // fp32 scales, or nullptr when double-quantized
  const uint8_t* codes;         // double-quantized: 8-bit code per block
  const float* nested_absmax;   // one per nested_blocksize codes
  const float* nested_code;     // 256 entries
  int64_t nested_blocksize;
  float offset;

  __device__ __forceinline__ float operator()(int64_t block) const {
    if (absmax != nullptr) return absmax[block];
    return __fadd_rn(__fmul_rn(nested_code[codes[block]], nested_absmax[block / nested_blocksize]), offset);
  }
};

template <typename out_t, bool kVector>
__global__ void __launch_bounds__(kThreads)
    nf4_dequantize_kernel(const uint8_t* __restrict__ packed, int64_t nbytes, int64_t n, int64_t blocksize,
                          BlockScales scales, out_t* __restrict__ out) {
  __shared__ float levels[16];
  if (threadIdx.x < 16) levels[threadIdx.x] = nf4::level(threadIdx.x);
  __syncthreads();
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t byte0 = chunk * kBytes, elem0 = chunk * 2 * kBytes;
  if (byte0 >= nbytes) return;
  const float s = scales(elem0 / blocksize);
  if (kVector && elem0 + 2 * kBytes <= n) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(packed + byte0));
    const uint8_t* b = reinterpret_cast<const uint8_t*>(&raw);
    alignas(16) out_t v[2 * kBytes];
#pragma unroll
    for (int j = 0; j < kBytes; ++j) {
      v[2 * j] = static_cast<out_t>(levels[b[j] >> 4] * s);
      v[2 * j + 1] = static_cast<out_t>(levels[b[j] & 15] * s);
    }
#pragma unroll
    for (int q = 0; q < static_cast<int>(sizeof(v) / 16); ++q)
      reinterpret_cast<uint4*>(out + elem0)[q] = reinterpret_cast<const uint4*>(v)[q];
    return;
  }
  for (int j = 0; j < kBytes && byte0 + j < nbytes; ++j) {
    const uint8_t b = packed[byte0 + j];
    const int64_t e = elem0 + 2 * j;
    out[e] = static_cast<out_t>(levels[b >> 4] * s);
    if (e + 1 < n) out[e + 1] = static_cast<out_t>(levels[b & 15] * s);
  }
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& packed_in, const at::Tensor& absmax_in,
                               const c10::optional<at::Tensor>& nested_absmax,
                               const c10::optional<at::Tensor>& nested_code, double offset, int64_t blocksize,
                               int64_t nested_blocksize, at::IntArrayRef shape, at::ScalarType dtype) {
  check_nf4_dequantize_args(packed_in, absmax_in, nested_absmax, nested_code, blocksize, nested_blocksize, shape,
                            dtype);
  check_device(packed_in, at::kCUDA, "lora_fused.nf4_dequantize", "packed");
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor absmax = absmax_in.contiguous();
  at::Tensor na, nc;
  BlockScales scales{nullptr, nullptr, nullptr, nullptr, 1, static_cast<float>(offset)};
  if (absmax.scalar_type() == at::kByte) {
    na = nested_absmax->contiguous();
    nc = nested_code->contiguous();
    scales.codes = absmax.data_ptr<uint8_t>();
    scales.nested_absmax = na.data_ptr<float>();
    scales.nested_code = nc.data_ptr<float>();
    scales.nested_blocksize = nested_blocksize;
  } else {
    scales.absmax = absmax.data_ptr<float>();
  }
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  const int64_t n = out.numel(), nbytes = packed.numel();
  if (n == 0) return out;
  const bool aligned = reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0;
  const unsigned int grid = cuda::grid_x(cuda::ceil_div<int64_t>(cuda::ceil_div<int64_t>(nbytes, kBytes), kThreads),
                                         "lora_fused.nf4_dequantize");
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nf4_dequantize_cuda", [&] {
    auto* dst = out.data_ptr<scalar_t>();
    if (aligned) {
      nf4_dequantize_kernel<scalar_t, true>
          <<<grid, kThreads, 0, stream>>>(packed.data_ptr<uint8_t>(), nbytes, n, blocksize, scales, dst);
    } else {
      nf4_dequantize_kernel<scalar_t, false>
          <<<grid, kThreads, 0, stream>>>(packed.data_ptr<uint8_t>(), nbytes, n, blocksize, scales, dst);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_fused, CUDA, m) { m.impl("nf4_dequantize", &nf4_dequantize_cuda); }

}  // namespace lora_fused
