// Variants of the NF4 dequantizer for scripts/probe_nf4_dequantize.py (development probe, built on
// the GPU machine with torch.utils.cpp_extension.load): which of the knobs below brings the
// whole-weight decode nearer the device's copy bandwidth. Row-major weight, numel % 8 == 0, bf16 out.
//   kUnroll   4-byte groups per thread in flight
//   kResident a grid of resident blocks striding over the groups (else one block per chunk)
//   kShflScale the block scale loaded by one lane of each 8 and shuffled (blocksize >= 64)
//   kPairLut  one shared 256-entry table of (high, low) level pairs per byte: 4 shared loads per
//             group instead of 8
//   kCvt2     two floats to bf16x2 in one conversion
//   kStream   output stored with the evict-first (streaming) hint
//   kPairGrp  two adjacent 8-element groups per thread (an 8-byte load, two adjacent 16-byte stores)
//   kNoDecode the ceiling of this traffic: each 4-byte word stored 4 times over as the 16-byte group (no
//             scale, no table), the same bytes read and written as a decode
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <torch/extension.h>

#include "cuda/nf4_decode.cuh"

using lora_fused::cuda::BlockScales;

template <int kUnroll, bool kResident, bool kShflScale, bool kPairLut, bool kCvt2, bool kStream, bool kPairGrp, bool kNoDecode>
__global__ void __launch_bounds__(256)
    dequant_kernel(const uint8_t* __restrict__ packed, uint32_t groups, int bs_shift, BlockScales scales,
                   __nv_bfloat16* __restrict__ out) {
  __shared__ float levels[16];
  __shared__ float2 pairs[256];
  __shared__ float code[256];
  if (threadIdx.x < 16) levels[threadIdx.x] = lora_fused::nf4::level(threadIdx.x);
  if (kPairLut)
    pairs[threadIdx.x] = make_float2(lora_fused::nf4::level(threadIdx.x >> 4), lora_fused::nf4::level(threadIdx.x & 15));
  scales.load_code(code);
  __syncthreads();
  // Units of kG adjacent groups per thread; a 64-element scale block spans 8 / kG lanes.
  constexpr int kG = kPairGrp ? 2 : 1;
  constexpr int kLanesPerScale = 8 / kG;
  const uint32_t units = groups / kG;
  const uint32_t chunk = blockDim.x * kUnroll;
  const uint32_t stride = kResident ? gridDim.x * chunk : units;
  const int lane = threadIdx.x & 31;
  for (uint32_t base = blockIdx.x * chunk + threadIdx.x; base - threadIdx.x < units; base += stride) {
    uint32_t words[kUnroll][kG];
    BlockScales::Parts parts[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t i = base + u * blockDim.x;
      if (kPairGrp) {
        const uint2 w2 = i < units ? __ldg(reinterpret_cast<const uint2*>(packed) + i) : make_uint2(0u, 0u);
        words[u][0] = w2.x;
        words[u][kG - 1] = w2.y;
      } else {
        words[u][0] = i < units ? __ldg(reinterpret_cast<const uint32_t*>(packed) + i) : 0u;
      }
      const uint32_t ii = i < units ? i : units - 1;
      if (!kShflScale || (lane % kLanesPerScale) == 0) parts[u] = scales.load((8 * kG * static_cast<int64_t>(ii)) >> bs_shift);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t i = base + u * blockDim.x;
      float s = ((!kShflScale || (lane % kLanesPerScale) == 0)) ? scales.finish(parts[u], code) : 0.f;
      if (kShflScale) s = __shfl_sync(0xffffffffu, s, lane & ~(kLanesPerScale - 1));
      if (i >= units) continue;
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        float v[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t b = (words[u][g] >> (8 * j)) & 0xffu;
          if (kPairLut) {
            const float2 p = pairs[b];
            v[2 * j] = p.x * s;
            v[2 * j + 1] = p.y * s;
          } else {
            v[2 * j] = levels[b >> 4] * s;
            v[2 * j + 1] = levels[b & 15] * s;
          }
        }
        uint4 o;
        uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (kCvt2) {
            const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
            ow[j] = *reinterpret_cast<const uint32_t*>(&h);
          } else {
            const __nv_bfloat16 a = __float2bfloat16(v[2 * j]), c = __float2bfloat16(v[2 * j + 1]);
            ow[j] = static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&a)) |
                    (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&c)) << 16);
          }
        }
        if (kNoDecode) o = make_uint4(words[u][g], words[u][g], words[u][g], words[u][g]);
        uint4* dst = reinterpret_cast<uint4*>(out) + static_cast<size_t>(i) * kG + g;
        if (kStream)
          __stcs(dst, o);
        else
          *dst = o;
      }
    }
  }
}

template <int kUnroll, bool kResident, bool kShflScale, bool kPairLut, bool kCvt2, bool kStream, bool kPairGrp, bool kNoDecode>
void launch(const at::Tensor& packed, const at::Tensor& codes, const at::Tensor& nested_absmax,
            const at::Tensor& nested_code, double offset, int64_t blocksize, at::Tensor& out, int64_t blocks_per_sm) {
  const auto kernel = dequant_kernel<kUnroll, kResident, kShflScale, kPairLut, kCvt2, kStream, kPairGrp, kNoDecode>;
  const uint32_t groups = static_cast<uint32_t>(out.numel() / 8);
  const BlockScales s = lora_fused::cuda::make_block_scales(codes, nested_absmax, nested_code, offset, 256);
  const uint32_t units = groups / (kPairGrp ? 2 : 1);
  int64_t grid = (units + 256 * kUnroll - 1) / (256 * kUnroll);
  if (kResident) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 256, 0));
    if (blocks_per_sm > 0) per_sm = std::min<int>(per_sm, blocks_per_sm);
    grid = std::min<int64_t>(grid, static_cast<int64_t>(per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  }
  kernel<<<static_cast<unsigned>(grid), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      packed.data_ptr<uint8_t>(), groups, lora_fused::cuda::log2_exact(blocksize), s,
      reinterpret_cast<__nv_bfloat16*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// variant: a bit field (unroll8 | resident << 1 | shfl << 2 | pairlut << 3 | cvt2 << 4 | stream << 5 | pairgrp << 6 | nodecode << 7)
at::Tensor dequant(const at::Tensor& packed, const at::Tensor& codes, const at::Tensor& nested_absmax,
                   const at::Tensor& nested_code, double offset, int64_t blocksize, int64_t n, int64_t k,
                   int64_t variant, int64_t blocks_per_sm) {
  at::Tensor out = at::empty({n, k}, packed.options().dtype(at::kBFloat16));
  TORCH_CHECK(blocksize == 64 && (n * k) % 16 == 0);
#define V(v)                                                                                                         \
  case v:                                                                                                            \
    launch<(v) & 1 ? 8 : 4, ((v) & 2) != 0, ((v) & 4) != 0, ((v) & 8) != 0, ((v) & 16) != 0, ((v) & 32) != 0,         \
           ((v) & 64) != 0, ((v) & 128) != 0>(                                                                                         \
        packed, codes, nested_absmax, nested_code, offset, blocksize, out, blocks_per_sm);                            \
    break;
  switch (variant) {  // the variants the probe's default list runs (each one costs compile time)
    V(6) V(22) V(38) V(134) V(166)
    default:
      TORCH_CHECK(false, "variant ", variant, " is not built");
  }
#undef V
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("dequant", &dequant); }
