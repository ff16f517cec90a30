// NF4 dequantization on CUDA. Coalesced both ways: lane l of a warp loads packed bytes
// [4l, 4l+4) of the warp's 128-byte span and stores their 8 outputs as one 16-byte vector, so a warp
// reads 128 contiguous bytes and writes 512 (bf16/fp16); each thread has kUnroll such loads in
// flight. 8 elements never straddle a quantization block (blocksize >= 32), so each group decodes one
// block scale; the double-quantized scale is decoded in place, never in a separate pass, rounding as
// bitsandbytes does (mul, then add; --fmad=false), its 8-bit code looked up in a shared copy of the
// nested code table so the group waits on one global round trip, not two. Tails and misaligned inputs take a per-byte path.
// Whole aligned weights of a multiple of 8 elements go to the slab decoder's kernel instead
// (nf4_dequantize_rect.cu); this one serves the rest.
// Measured on an H100 at 4096x11008 bf16: 8 bytes per thread written as 32 contiguous bytes per lane
// reached 2.33 TB/s; 16 bytes per thread (64 contiguous bytes per lane) fell to 1.64 TB/s, the
// scattered stores costing more than the extra bytes in flight gained.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/common.cuh"
#include "cuda/nf4_decode.cuh"
#include "nf4_format.h"

namespace lora_fused {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;                               // 4-byte groups per thread
constexpr int64_t kBlockBytes = 4LL * kThreads * kUnroll;  // packed bytes per thread block

template <typename out_t, bool kVector>
__global__ void __launch_bounds__(kThreads)
    nf4_dequantize_kernel(const uint8_t* __restrict__ packed, int64_t nbytes, int64_t n, int bs_shift,
                          cuda::BlockScales scales, out_t* __restrict__ out) {
  __shared__ float levels[16];
  __shared__ float code[256];  // the nested code table (double quantization): see BlockScales::load
  if (threadIdx.x < 16) levels[threadIdx.x] = nf4::level(threadIdx.x);
  scales.load_code(code);
  __syncthreads();
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kBlockBytes;
  uint32_t words[kUnroll];
  bool full[kUnroll];
  cuda::BlockScales::Parts parts[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll in flight
    const int64_t byte0 = base + 4LL * (u * kThreads + threadIdx.x);
    full[u] = kVector && 2 * byte0 + 8 <= n;
    words[u] = full[u] ? __ldg(reinterpret_cast<const uint32_t*>(packed + byte0)) : 0u;
    if (byte0 < nbytes) parts[u] = scales.load((2 * byte0) >> bs_shift);
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t byte0 = base + 4LL * (u * kThreads + threadIdx.x);
    if (byte0 >= nbytes) continue;
    const int64_t elem0 = 2 * byte0;
    const float s = scales.finish(parts[u], code);
    if (full[u]) {
      cuda::store8(out + elem0, words[u], s, levels);
      continue;
    }
    for (int j = 0; j < 4 && byte0 + j < nbytes; ++j) {
      const uint8_t b = packed[byte0 + j];
      const int64_t e = elem0 + 2 * j;
      out[e] = static_cast<out_t>(levels[b >> 4] * s);
      if (e + 1 < n) out[e + 1] = static_cast<out_t>(levels[b & 15] * s);
    }
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
  const c10::optional<at::Tensor> na = nested_absmax.has_value() ? c10::optional<at::Tensor>(nested_absmax->contiguous()) : c10::nullopt;
  const c10::optional<at::Tensor> nc = nested_code.has_value() ? c10::optional<at::Tensor>(nested_code->contiguous()) : c10::nullopt;
  const cuda::BlockScales scales = cuda::make_block_scales(absmax, na, nc, offset, nested_blocksize);
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  const int64_t n = out.numel(), nbytes = packed.numel();
  if (n == 0) return out;
  const bool aligned = reinterpret_cast<uintptr_t>(packed.data_ptr()) % 4 == 0;
  if (aligned && n % 8 == 0 && n / 8 <= (int64_t{1} << 30)) {
    // The slab decoder's kernel over the weight as one row (resident grid, shared block scales):
    // 2-4% faster than the kernel below on an H200 (scripts/probe_nf4_dequantize.py).
    Nf4Weight w;
    w.packed = packed;
    w.absmax = absmax;
    w.nested_absmax = na;
    w.nested_code = nc;
    w.offset = offset;
    w.blocksize = blocksize;
    w.nested_blocksize = nested_blocksize;
    w.out_features = 1;
    w.in_features = n;
    return nf4_dequantize_rect_cuda(w, 0, 1, 0, n, dtype).view(shape);
  }
  const int bs_shift = cuda::log2_exact(blocksize);  // a power of two (checked above)
  const unsigned int grid = cuda::grid_x(cuda::ceil_div<int64_t>(nbytes, kBlockBytes), "lora_fused.nf4_dequantize");
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nf4_dequantize_cuda", [&] {
    auto* dst = out.data_ptr<scalar_t>();
    if (aligned) {
      nf4_dequantize_kernel<scalar_t, true>
          <<<grid, kThreads, 0, stream>>>(packed.data_ptr<uint8_t>(), nbytes, n, bs_shift, scales, dst);
    } else {
      nf4_dequantize_kernel<scalar_t, false>
          <<<grid, kThreads, 0, stream>>>(packed.data_ptr<uint8_t>(), nbytes, n, bs_shift, scales, dst);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_fused, CUDA, m) { m.impl("nf4_dequantize", &nf4_dequantize_cuda); }

}  // namespace lora_fused
