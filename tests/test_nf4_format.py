"""NF4 quantize/dequantize: the format from its definition, byte-compatibility with bitsandbytes,
CPU == CUDA bytes, state-dict round trips, opcheck and bad inputs."""

import json

import pytest
import torch

from lora_fused import _ops, nf4, reference
from conftest import DEVICES, HAS_CUDA, CUDA_SKIP_REASON, poison_allocator, randn


SHAPES = [(1, 32), (3, 7), (17, 33), (64, 64), (128, 100), (31, 129), (1, 4097), (300, 513)]
BLOCKSIZES = [32, 64, 128, 256, 4096]


def _weight(shape, dtype, device):
    # Heavy-tailed, like trained weights, with a few exact zeros.
    w = torch.randn(*shape) * torch.rand(*shape).pow(2).add(0.1)
    w.view(-1)[:: max(1, w.numel() // 5)] = 0.0
    return w.to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_matches_format_definition(device, dtype, shape, blocksize):
    w = _weight(shape, dtype, device)
    poison_allocator(device)
    packed, absmax = _ops.nf4_quantize(w, blocksize)
    ref_packed, ref_absmax = reference.nf4_quantize(w, blocksize)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == ((w.numel() + 1) // 2, 1)
    assert torch.equal(packed.cpu(), ref_packed)
    assert torch.equal(absmax.cpu(), ref_absmax)


def test_midpoint_ties_go_to_the_lower_level():
    levels = nf4.nf4_code()
    mids = (levels[:-1] + levels[1:]) / 2
    # One block of 32: the absmax element (1.0) first, then every midpoint exactly, then padding.
    w = torch.cat([torch.tensor([1.0]), mids, torch.zeros(32 - 1 - 15)])
    packed, _ = _ops.nf4_quantize(w, 32)
    nibbles = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1)
    assert nibbles[1:16].tolist() == list(range(15))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,blocksize", [((17, 33), 32), ((128, 100), 64), ((300, 513), 64), ((64, 4096), 256)])
def test_dequantize_matches_float64_reference(device, dtype, double_quant, shape, blocksize):
    w = _weight(shape, dtype, device)
    packed, state = nf4.quantize(w, blocksize, double_quant=double_quant)
    poison_allocator(device)
    out = nf4.dequantize(packed, state)
    assert out.dtype == dtype and out.shape == w.shape and out.device.type == device
    ref = reference.nf4_dequantize(packed, state)
    # level * scale is one fp32 product on both sides; narrower outputs round that product once more.
    assert torch.equal(out.cpu(), ref.float().to(dtype))
    # And it is a faithful NF4 reconstruction: within half the widest level gap times absmax.
    err = (out.double().cpu() - w.double().cpu()).abs()
    assert err.max() <= 0.17 * w.abs().max().double().cpu() * 1.01


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)
@pytest.mark.cuda
@pytest.mark.parametrize("shape,blocksize", [((17, 33), 32), ((300, 513), 64), ((1024, 1024), 64), ((64, 4097), 4096)])
def test_cpu_and_cuda_give_the_same_bytes(shape, blocksize):
    w = _weight(shape, torch.bfloat16, "cpu")
    p_cpu, s_cpu = nf4.quantize(w, blocksize)
    p_gpu, s_gpu = nf4.quantize(w.cuda(), blocksize)
    assert torch.equal(p_cpu, p_gpu.cpu())
    raw_cpu = _ops.nf4_quantize(w, blocksize)[1]
    raw_gpu = _ops.nf4_quantize(w.cuda(), blocksize)[1]
    assert torch.equal(raw_cpu, raw_gpu.cpu())
    # The nested codes depend on mean(absmax), whose summation order differs by device; given the same
    # offset they are identical.
    q_cpu, a2_cpu = _ops.blockwise_quantize(raw_cpu - 0.125, nf4.dynamic_map(), 256)
    q_gpu, a2_gpu = _ops.blockwise_quantize(raw_gpu - 0.125, nf4.dynamic_map("cuda"), 256)
    assert torch.equal(q_cpu, q_gpu.cpu()) and torch.equal(a2_cpu, a2_gpu.cpu())
    assert torch.equal(nf4.dequantize(p_cpu, s_cpu), nf4.dequantize(p_gpu, s_cpu.to("cuda")).cpu())


def test_dynamic_map_is_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    assert torch.equal(nf4.dynamic_map(), F.create_dynamic_map(signed=True))
    assert torch.equal(nf4.nf4_code(), F.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,blocksize", [((17, 33), 32), ((128, 100), 64), ((300, 513), 64), ((256, 1000), 128), ((64, 4097), 4096)])
def test_bytes_match_bitsandbytes(device, dtype, shape, blocksize):
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    w = _weight(shape, dtype, device)
    ours_packed, ours = nf4.quantize(w, blocksize)
    theirs_packed, theirs = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    assert torch.equal(ours_packed.cpu(), theirs_packed.cpu()), "4-bit codes differ from bitsandbytes"
    assert ours.offset == theirs.offset.item()
    assert torch.equal(ours.state2.absmax.cpu(), theirs.state2.absmax.cpu())
    assert torch.equal(ours.state2.code.cpu(), theirs.state2.code.cpu())
    # Nested absmax codes: ours is the exact nearest code (ties down). bitsandbytes finds it through a
    # 65536-step lookup grid on CPU and a binary search with its own tie rule on CUDA, so it may pick
    # the neighbour; where the two differ, they are adjacent and ours is at least as close.
    q_ours, q_theirs = ours.absmax.cpu().long(), theirs.absmax.cpu().long()
    diff = q_ours != q_theirs
    if diff.any():
        assert (q_ours - q_theirs)[diff].abs().max() == 1
        raw = _ops.nf4_quantize(w, blocksize)[1].cpu()
        target = ((raw - ours.offset) / ours.state2.absmax.cpu().repeat_interleave(256)[: raw.numel()])[diff]
        code = ours.state2.code.cpu()
        assert ((code[q_ours[diff]] - target).abs() <= (code[q_theirs[diff]] - target).abs()).all()
        assert diff.float().mean() < 0.05
    # Both decode to within the nested code's resolution of each other.
    ours_w = nf4.dequantize(ours_packed, ours)
    theirs_w = F.dequantize_4bit(theirs_packed, theirs)
    assert torch.allclose(ours_w.float().cpu(), theirs_w.float().cpu(), rtol=2e-2, atol=1e-3 * w.abs().max().item())


def test_bitsandbytes_decodes_our_bytes_exactly():
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    from bitsandbytes.functional import QuantState as BnbQuantState

    w = _weight((96, 200), torch.bfloat16, "cpu")
    packed, state = nf4.quantize(w, 64)
    theirs_state = BnbQuantState.from_dict(state.as_dict(packed=True), device=torch.device("cpu"))
    theirs = F.dequantize_4bit(packed, theirs_state)
    assert torch.equal(nf4.dequantize(packed, state), theirs)


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip(double_quant):
    w = _weight((40, 72), torch.bfloat16, "cpu")
    packed, state = nf4.quantize(w, 64, double_quant=double_quant)
    d = state.as_dict(packed=True)
    meta = json.loads(bytes(d["quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["quant_type"] == "nf4" and meta["blocksize"] == 64 and meta["dtype"] == "bfloat16"
    assert meta["shape"] == [40, 72]
    expected = {"absmax", "quant_map", "quant_state.bitsandbytes__nf4"}
    if double_quant:
        expected |= {"nested_absmax", "nested_quant_map"}
        assert meta["nested_blocksize"] == 256 and meta["nested_dtype"] == "float32"
    assert set(d) == expected
    back = nf4.QuantState.from_dict({"weight." + k: v for k, v in d.items()})
    assert torch.equal(nf4.dequantize(packed, back), nf4.dequantize(packed, state))


def test_state_dict_equals_bitsandbytes():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from bitsandbytes.functional import quantize_4bit

    w = _weight((64, 96), torch.float16, "cpu")
    _, ours = nf4.quantize(w, 64, double_quant=False)
    _, theirs = quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    a, b = ours.as_dict(packed=True), theirs.as_dict(packed=True)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    w = randn(37, 65, dtype=torch.bfloat16, device=device)
    torch.library.opcheck(torch.ops.lora_fused.nf4_quantize.default, (w, 64))
    packed, state = nf4.quantize(w, 64)
    s2 = state.state2
    args = (packed, state.absmax, s2.absmax, s2.code, state.offset, 64, 256, [37, 65], torch.bfloat16)
    torch.library.opcheck(torch.ops.lora_fused.nf4_dequantize.default, args)
    raw = _ops.nf4_quantize(w, 64)[1]
    torch.library.opcheck(torch.ops.lora_fused.blockwise_quantize.default, (raw - raw.mean(), nf4.dynamic_map(device), 256))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_give_clear_errors(device):
    w = randn(16, 64, device=device)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        nf4.quantize(w, 48)
    with pytest.raises(ValueError, match="power of two"):
        _ops.nf4_quantize(w, 8192)
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        _ops.nf4_quantize(w.to(torch.int32), 64)
    with pytest.raises(ValueError, match="NaN or Inf"):
        nf4.quantize(torch.full((4, 64), float("nan"), device=device))
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize(torch.empty(0, 64, device=device))
    packed, state = nf4.quantize(w, 64)
    with pytest.raises(TypeError, match="uint8"):
        _ops.nf4_dequantize(packed.to(torch.int16), state.absmax, state.state2.absmax, state.state2.code, 0.0, 64, 256, [16, 64], torch.float32)
    with pytest.raises(ValueError, match="packs into"):
        _ops.nf4_dequantize(packed, state.absmax, state.state2.absmax, state.state2.code, 0.0, 64, 256, [16, 65], torch.float32)
    with pytest.raises(ValueError, match="need absmax of"):
        _ops.nf4_dequantize(packed, state.absmax[:-1], state.state2.absmax, state.state2.code, 0.0, 64, 256, [16, 64], torch.float32)
    with pytest.raises(ValueError, match="needs nested_absmax"):
        _ops.nf4_dequantize(packed, state.absmax, None, None, 0.0, 64, 256, [16, 64], torch.float32)
    with pytest.raises(TypeError, match="output dtype"):
        _ops.nf4_dequantize(packed, state.absmax, state.state2.absmax, state.state2.code, 0.0, 64, 256, [16, 64], torch.int8)
    with pytest.raises(TypeError, match="QuantState"):
        nf4.dequantize(packed, {"absmax": state.absmax})
    with pytest.raises(ValueError, match="not the NF4 code table"):
        d = state.as_dict(packed=True)
        d["quant_map"] = d["quant_map"].flip(0)
        nf4.QuantState.from_dict(d)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(40, 72), (33, 65)])
def test_dequantize_misaligned_packed_data(device, shape):
    # A packed tensor that starts one byte into its storage takes the per-byte path; same result.
    w = _weight(shape, torch.bfloat16, device)
    packed, state = nf4.quantize(w, 32)
    buf = torch.empty(packed.numel() + 1, 1, dtype=torch.uint8, device=device)
    buf[1:].copy_(packed)
    assert torch.equal(nf4.dequantize(buf[1:], state), nf4.dequantize(packed, state))
