"""gemm_concat_k: a @ b.T + a2 @ b2.T + bias as one GEMM over the concatenated K, against float64."""

import pytest
import torch

import lora_fused
from conftest import DEVICES, DTYPES, HAS_CUDA, CUDA_SKIP_REASON, assert_error_rule, poison_allocator, randn  # noqa: F401
from lora_fused import _ops

ON_HOPPER = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0) and lora_fused.build_info()["sm90_gemm"]

# (M, N, K1, K2): tile boundaries +-1 (tiles are 128 x 256 x 64), odd sizes (the cuBLAS fallback),
# one row, ranks 1..256, K1 not a multiple of the k-tile, and a few thousand rows.
SHAPES = [
    (1, 64, 64, 8),
    (7, 40, 96, 16),
    (17, 256, 128, 8),
    (127, 264, 200, 16),
    (129, 255, 130, 5),
    (300, 520, 4104, 64),
    (256, 512, 64, 256),
    (513, 136, 72, 24),
    (2049, 1032, 520, 16),
    (4097, 2056, 200, 8),  # enough tiles for the Hopper kernel by itself; K1 not a multiple of 64
    (4500, 4104, 72, 24),
    # add_low_rank's kernel (the LoRA term after the base GEMM): odd ranks, rank 1, a partial last
    # column tile and row tile, a handful of rows.
    (65, 260, 96, 7),
    (33, 1028, 64, 1),
    (3, 12, 40, 3),
    (97, 1540, 64, 63),
]


def _operands(M, N, K1, K2, dtype, device, b_layout):
    a = randn(M, K1, dtype=dtype, device=device)
    a2 = randn(M, K2, dtype=dtype, device=device, scale=0.5)
    if b_layout == "k_major":  # a weight [N, K] as stored: the forward
        b = randn(N, K1, dtype=dtype, device=device, scale=K1**-0.5)
        b2 = randn(N, K2, dtype=dtype, device=device, scale=0.3)
    else:  # a transposed view of a [K, N] weight: the input gradient (dY @ W)
        b = randn(K1, N, dtype=dtype, device=device, scale=K1**-0.5).t()
        b2 = randn(K2, N, dtype=dtype, device=device, scale=0.3).t()
    return a, b, a2, b2


def _reference(a, b, a2, b2, bias):
    out = a.double() @ b.double().t() + a2.double() @ b2.double().t()
    return out + bias.double() if bias is not None else out


def _torch_same_dtype(a, b, a2, b2, bias):
    out = a @ b.t() + a2 @ b2.t()
    return out + bias if bias is not None else out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b_layout", ["k_major", "n_major"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_against_float64(device, dtype, b_layout, with_bias, shape, gemm_path):
    M, N, K1, K2 = shape
    if device == "cpu" and gemm_path == "sm90":
        pytest.skip("the path switch is the CUDA op's; CPU is covered by the 'default' case")
    if device == "cpu" and M * N * K1 > 1e8:
        pytest.skip("large CPU case: the CPU path is two ATen GEMMs, covered by the smaller shapes")
    a, b, a2, b2 = _operands(M, N, K1, K2, dtype, device, b_layout)
    bias = randn(N, dtype=dtype, device=device) if with_bias else None
    poison_allocator(device)
    out = _ops.gemm_concat_k(a, b, a2, b2, bias)
    assert out.dtype == dtype and out.shape == (M, N) and out.is_contiguous()
    assert_error_rule(out, _reference(a, b, a2, b2, bias), _torch_same_dtype(a, b, a2, b2, bias), f"{shape} {b_layout}")


@pytest.mark.parametrize("device", DEVICES)
def test_strided_and_offset_operands(device, gemm_path):
    # Row strides wider than K (slices of bigger tensors), a column offset that breaks 16-byte
    # alignment (must fall back, still right), and a non-contiguous output-sized bias.
    dtype = torch.bfloat16
    M, N, K1, K2 = 300, 264, 136, 16
    big_a = randn(M, K1 + 40, dtype=dtype, device=device)
    big_a2 = randn(M, 64, dtype=dtype, device=device)
    b = randn(N, K1, dtype=dtype, device=device, scale=K1**-0.5)
    b2 = randn(N, K2, dtype=dtype, device=device)
    for a, a2 in (
        (big_a[:, :K1], big_a2[:, 8 : 8 + K2]),  # aligned slices: the fast path can take them
        (big_a[:, 1 : 1 + K1], big_a2[:, 1 : 1 + K2]),  # misaligned by one element
        (big_a[::2, :K1], big_a2[::2, :K2]),  # every other row
    ):
        bias = randn(2 * N, dtype=dtype, device=device)[::2]
        out = _ops.gemm_concat_k(a, b, a2, b2, bias)
        assert_error_rule(out, _reference(a, b, a2, b2, bias), _torch_same_dtype(a, b, a2, b2, bias), "strided")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_dimensions(device):
    a, b, a2, b2 = _operands(0, 16, 32, 8, torch.bfloat16, device, "k_major")
    assert _ops.gemm_concat_k(a, b, a2, b2).shape == (0, 16)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for layout in ("k_major", "n_major"):
        a, b, a2, b2 = _operands(33, 48, 64, 16, torch.bfloat16, device, layout)
        bias = randn(48, dtype=torch.bfloat16, device=device)
        torch.library.opcheck(torch.ops.lora_fused.gemm_concat_k.default, (a, b, a2, b2, bias))
        torch.library.opcheck(torch.ops.lora_fused.gemm_concat_k.default, (a, b, a2, b2, None))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_say_what_was_given(device):
    a, b, a2, b2 = _operands(8, 16, 32, 8, torch.bfloat16, device, "k_major")
    with pytest.raises(ValueError, match=r"a \[M, K1\], b \[N, K1\]"):
        _ops.gemm_concat_k(a, b[:, :16], a2, b2)
    with pytest.raises(ValueError, match="K2"):
        _ops.gemm_concat_k(a, b, a2, b2[:, :4])
    with pytest.raises(TypeError, match="same dtype"):
        _ops.gemm_concat_k(a, b.float(), a2, b2)
    with pytest.raises(ValueError, match="bias must have shape"):
        _ops.gemm_concat_k(a, b, a2, b2, torch.zeros(3, dtype=a.dtype, device=device))
    with pytest.raises(ValueError, match="2 dimensions"):
        _ops.gemm_concat_k(a[0], b, a2, b2)
    with pytest.raises(TypeError, match="bfloat16, float16, float32 or float64"):
        _ops.gemm_concat_k(a.to(torch.int32), b.to(torch.int32), a2.to(torch.int32), b2.to(torch.int32))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)
def test_other_device_is_refused():
    a, b, a2, b2 = _operands(8, 16, 32, 8, torch.bfloat16, "cuda", "k_major")
    with pytest.raises(RuntimeError, match="same device"):
        _ops.gemm_concat_k(a, b.cpu(), a2, b2)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90 GPU and a build with the Hopper GEMMs (9.0a + CUTLASS)")
@pytest.mark.parametrize("b_layout", ["k_major", "n_major"])
@pytest.mark.parametrize("case", ["large_auto", "small_forced"])
def test_hopper_kernel_is_the_one_that_runs(b_layout, case, monkeypatch):
    # Asked for, aligned bf16 operands must take the CUTLASS kernel, not the cuBLAS fallback: a path
    # that never runs would pass every accuracy test above. "auto" takes it for large problems.
    if case == "large_auto":
        monkeypatch.setenv("LORA_FUSED_GEMM_CONCAT_K", "auto")
        a, b, a2, b2 = _operands(4096, 2048, 256, 16, torch.bfloat16, "cuda", b_layout)
    else:
        monkeypatch.setenv("LORA_FUSED_GEMM_CONCAT_K", "sm90")
        a, b, a2, b2 = _operands(512, 1024, 512, 16, torch.bfloat16, "cuda", b_layout)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _ops.gemm_concat_k(a, b, a2, b2)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("ConcatKMainloop" in n for n in names), f"kernels that ran: {names}"
    assert not any("gemm" in n.lower() and "ConcatKMainloop" not in n for n in names), f"a cuBLAS GEMM ran too: {names}"


@pytest.mark.cuda
@pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90 GPU and a build with the Hopper GEMMs (9.0a + CUTLASS)")
@pytest.mark.parametrize("setting", ["auto", None])
def test_cublas_runs_by_default_and_for_few_tiles(monkeypatch, setting):
    # Unset: cuBLAS (the Hopper kernel is not yet faster). "auto": 512 x 1024 is 16 tiles of 128 x 256
    # on 132 SMs, where cuBLAS's smaller tiles are faster.
    if setting is None:
        monkeypatch.delenv("LORA_FUSED_GEMM_CONCAT_K", raising=False)
    else:
        monkeypatch.setenv("LORA_FUSED_GEMM_CONCAT_K", setting)
    a, b, a2, b2 = _operands(512, 1024, 512, 16, torch.bfloat16, "cuda", "k_major")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _ops.gemm_concat_k(a, b, a2, b2)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert not any("ConcatKMainloop" in n for n in names), f"kernels that ran: {names}"
