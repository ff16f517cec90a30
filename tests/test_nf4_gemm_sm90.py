"""The NF4 Hopper GEMM (lora_fused::nf4_gemm_sm90), each tile shape, with the weight as bitsandbytes
packs it and as lora_fused::nf4_repack_sm90 reorders it (checked against its definition): against a float64 reference of
the formula it computes (bf16 NF4 level x bf16 group scale, group 64 along K), many shapes (odd M,
N multiples of 8 and not of the tiles), outputs poisoned first; and its input checks. Runs on an
sm_90 GPU with the Hopper GEMMs built; skips elsewhere with the reason."""

import pytest
import torch

import lora_fused
from lora_fused import nf4
from conftest import HAS_CUDA, assert_error_rule, poison_allocator, randn

ON_HOPPER = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0) and lora_fused.build_info()["sm90_gemm"]
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90 GPU and a build with the Hopper GEMMs")]

LEVELS = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
          -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
          0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
          0.7229568362236023, 1.0]


def _operands(n, k):
    w = randn(n, k, dtype=torch.float32, device="cuda", scale=k**-0.5)
    packed, state = nf4.quantize(w, blocksize=64, double_quant=False)  # fp32 absmax: the scales' source
    scales = state.absmax.view(n, k // 64).to(torch.bfloat16)
    b = packed.view(-1)
    codes = torch.stack([b >> 4, b & 15], dim=1).view(n, k).long()
    levels = torch.tensor(LEVELS, device="cuda").to(torch.bfloat16)
    w_bf16 = levels[codes] * scales.repeat_interleave(64, dim=1)  # the bf16 weight this GEMM multiplies by
    w_exact = levels[codes].double() * scales.double().repeat_interleave(64, dim=1)
    return packed, scales.t().contiguous(), w_bf16, w_exact


def _repack_reference(packed, n, k):
    """The Shuffled GEMMs' layout from its definition (csrc/cuda/sm90/nf4_gemm_impl.cuh, ShuffleAtom):
    in each 16 x 16 atom, row g + 8h and column e + 2t + 8j go to offset 32g + 8t + 4e + h + 2j; the
    atoms go rows first; element o sits in byte o // 2, the low nibble when o is even."""
    b = packed.view(-1).cpu()
    codes = torch.stack([b >> 4, b & 15], dim=1).view(n, k)
    r, c = torch.meshgrid(torch.arange(n), torch.arange(k), indexing="ij")
    m, q = r % 16, c % 16
    off = 256 * (r // 16 + (n // 16) * (c // 16)) + 32 * (m % 8) + 8 * ((q // 2) % 4) + 4 * (q % 2) + m // 8 + 2 * (q // 8)
    nib = torch.full((n * k,), 255, dtype=torch.uint8)
    nib[off.flatten()] = codes.flatten()
    assert (nib != 255).all()  # a permutation
    return nib[0::2] | (nib[1::2] << 4)


@pytest.mark.parametrize("n,k", [(16, 64), (48, 192), (272, 512), (1008, 1024)])
def test_nf4_repack_sm90_layout(n, k):
    packed, _, _, _ = _operands(n, k)
    got = torch.ops.lora_fused.nf4_repack_sm90(packed, n, k)
    assert got.dtype == torch.uint8 and got.shape == (n * k // 2,)
    assert torch.equal(got.cpu(), _repack_reference(packed, n, k))


@pytest.mark.parametrize("m,n,k", [(16, 128, 64), (1, 136, 256), (37, 264, 512), (300, 1000, 1024), (4096, 512, 4096),
                                   (512, 4104, 2048), (37, 272, 512), (300, 1008, 1024),
                                   (64, 128, 8192)])  # one tile, 128 k-tiles: stream-K splits K
@pytest.mark.parametrize("tile_tokens", [128, 256])
@pytest.mark.parametrize("shuffled", [False, True])
def test_nf4_gemm_sm90_matches_reference(m, n, k, tile_tokens, shuffled):
    packed, scales, w_bf16, w_exact = _operands(n, k)
    if shuffled and n % 16:
        with pytest.raises(RuntimeError, match="needs N % 16 == 0 and K % 64 == 0; got N="):
            torch.ops.lora_fused.nf4_repack_sm90(packed, n, k)
        return
    w = torch.ops.lora_fused.nf4_repack_sm90(packed, n, k) if shuffled else packed
    x = randn(m, k, dtype=torch.bfloat16, device="cuda")
    poison_allocator("cuda")
    y = torch.ops.lora_fused.nf4_gemm_sm90(x, w, scales, n, tile_tokens, shuffled)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert_error_rule(y, x.double() @ w_exact.t(), x @ w_bf16.t(), f"nf4_gemm_sm90 {m}x{n}x{k} tile {tile_tokens} shuffled={shuffled}")


def test_nf4_gemm_sm90_bad_inputs():
    packed, scales, _, _ = _operands(64, 128)
    x = randn(4, 128, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="x must be bf16"):
        torch.ops.lora_fused.nf4_gemm_sm90(x.half(), packed, scales, 64)
    with pytest.raises(RuntimeError, match="N\\*K/2 uint8 codes"):
        torch.ops.lora_fused.nf4_gemm_sm90(x, packed[:-1], scales, 64)
    with pytest.raises(RuntimeError, match="bf16 scales"):
        torch.ops.lora_fused.nf4_gemm_sm90(x, packed, scales.float(), 64)
    with pytest.raises(RuntimeError, match="tile_tokens must be 128 or 256; got 64"):
        torch.ops.lora_fused.nf4_gemm_sm90(x, packed, scales, 64, 64)
