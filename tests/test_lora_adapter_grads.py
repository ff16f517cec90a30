"""lora_adapter_grads (the LoRA branch's backward in one op) against float64, on every operand
layout, with both of CUDA's GEMM routes (cuBLASLt with cached plans, and ATen); the CUDA kernel that
makes du and dB from one read of grad_out (shapes around its 256-row panels and 64-column chunks,
every rank class); opcheck; bad inputs."""

import pytest
import torch

from lora_fused import _ops, reference
from conftest import DEVICES, DTYPES, assert_error_rule, poison_allocator, randn, requires_cuda

SHAPES = [(1, 17, 9, 1), (7, 64, 40, 8), (64, 129, 255, 16), (333, 1000, 96, 64), (5, 255, 130, 256), (4097, 96, 200, 16)]


def _matrix(rows, cols, dtype, device, layout):
    if layout == "contiguous":
        return randn(rows, cols, dtype=dtype, device=device)
    if layout == "row_strided":  # a column slice at an odd offset: row stride > cols, 2-byte aligned
        return randn(rows, cols + 9, dtype=dtype, device=device)[:, 3 : 3 + cols]
    return randn(cols, rows, dtype=dtype, device=device).t()  # transposed: column-major


# (device, GEMM route): CUDA runs cuBLASLt with cached plans (the default) and ATen
# (LORA_FUSED_BLAS=aten); CPU has ATen only.
_CUDA = DEVICES[1]
DEVICE_BLAS = [("cpu", "aten")] + [pytest.param("cuda", b, marks=_CUDA.marks, id=f"cuda-{b}") for b in ("lt", "aten")]


@pytest.fixture
def route(monkeypatch):
    def set_route(blas):
        if blas == "aten":
            monkeypatch.setenv("LORA_FUSED_BLAS", "aten")
        else:
            monkeypatch.delenv("LORA_FUSED_BLAS", raising=False)
    return set_route


@pytest.mark.parametrize("device,blas", DEVICE_BLAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "transposed"])
def test_matches_reference(device, blas, dtype, M, K, N, r, layout, route):
    route(blas)
    dy = _matrix(M, N, dtype, device, layout)
    x = _matrix(M, K, dtype, device, layout)
    a = randn(r, K, dtype=dtype, device=device, scale=K**-0.5)
    b = _matrix(N, r, dtype, device, layout)
    s = 0.75
    poison_allocator(device)
    du, dA, dB = _ops.lora_adapter_grads(dy, x, a, b, s)
    ref_du, ref_dA, ref_dB = reference.lora_adapter_grads(dy, x, a, b, s)
    # PyTorch in the same dtype, as the layers computed it before this op.
    t_du = torch.mm(dy, b) * s
    t_dA, t_dB = torch.mm(t_du.t(), x), torch.mm(dy.t(), torch.mm(x, a.t()) * s)
    what = f"{device} {dtype} {M}x{K}->{N} r={r} {layout} {blas}"
    for name, ours, ref, same in (("du", du, ref_du, t_du), ("dA", dA, ref_dA, t_dA), ("dB", dB, ref_dB, t_dB)):
        assert ours.dtype == dtype and ours.device.type == device, name
        assert_error_rule(ours, ref, same, f"{name} {what}")


def _cuda_kernel_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


# (M, N, r) for the one-read kernel: M = 1, panel edges (255, 256, 257), column chunks cut short
# (N % 64 != 0), several panels and column splits, every rank class (r <= 16, 32, 64; r not a
# multiple of 8), and a QLoRA layer's size (4097 x 11008).
DY_GRADS_SHAPES = [(1, 8, 2), (7, 40, 8), (255, 1000, 16), (256, 64, 6), (257, 4104, 32), (300, 136, 30),
                   (513, 264, 64), (1030, 2056, 40), (4097, 11008, 16)]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,r", DY_GRADS_SHAPES)
def test_one_read_kernel_matches_reference(dtype, M, N, r, monkeypatch):
    monkeypatch.setenv("LORA_FUSED_LORA_GRADS", "fused")  # also below the default's 2048 rows and r <= 32
    K = 24
    dy = randn(M, N, dtype=dtype, device="cuda")
    x = randn(M, K, dtype=dtype, device="cuda")
    a = randn(r, K, dtype=dtype, device="cuda", scale=K**-0.5)
    b = randn(N, r, dtype=dtype, device="cuda")
    s = 0.75
    poison_allocator("cuda")
    names = _cuda_kernel_names(lambda: _ops.lora_adapter_grads(dy, x, a, b, s))
    assert any("lora_dy_grads_kernel" in n for n in names), f"the one-read kernel did not run: {names}"
    du, dA, dB = _ops.lora_adapter_grads(dy, x, a, b, s)
    ref_du, ref_dA, ref_dB = reference.lora_adapter_grads(dy, x, a, b, s)
    t_du = torch.mm(dy, b) * s
    t_dA, t_dB = torch.mm(t_du.t(), x), torch.mm(dy.t(), torch.mm(x, a.t()) * s)
    for name, ours, ref, same in (("du", du, ref_du, t_du), ("dA", dA, ref_dA, t_dA), ("dB", dB, ref_dB, t_dB)):
        assert ours.dtype == dtype, name
        assert_error_rule(ours, ref, same, f"{name} {dtype} M={M} N={N} r={r}")
    # Fixed reduction order: the same bits on a second call.
    du2, dA2, dB2 = _ops.lora_adapter_grads(dy, x, a, b, s)
    assert torch.equal(du, du2) and torch.equal(dA, dA2) and torch.equal(dB, dB2)


@pytest.mark.cuda
@requires_cuda
def test_one_read_kernel_only_where_it_applies(monkeypatch):
    # LORA_FUSED_LORA_GRADS=gemm, odd r, r > 64, N % 8 != 0, fp32 and a strided grad_out take the two
    # GEMMs (and still match: test_matches_reference); =fused takes the kernel wherever it applies;
    # unset, from 2048 rows with r <= 32 only.
    M, K, N, r = 64, 32, 128, 8
    dy, x = randn(M, N, dtype=torch.bfloat16, device="cuda"), randn(M, K, dtype=torch.bfloat16, device="cuda")
    a, b = randn(r, K, dtype=torch.bfloat16, device="cuda"), randn(N, r, dtype=torch.bfloat16, device="cuda")
    ran = lambda *args: any("lora_dy_grads_kernel" in n for n in _cuda_kernel_names(lambda: _ops.lora_adapter_grads(*args)))  # noqa: E731
    monkeypatch.delenv("LORA_FUSED_LORA_GRADS", raising=False)
    assert not ran(dy, x, a, b, 1.0)  # 64 rows
    big_dy, big_x = randn(2048, N, dtype=torch.bfloat16, device="cuda"), randn(2048, K, dtype=torch.bfloat16, device="cuda")
    assert ran(big_dy, big_x, a, b, 1.0)
    assert ran(big_dy, big_x, randn(32, K, dtype=torch.bfloat16, device="cuda"), randn(N, 32, dtype=torch.bfloat16, device="cuda"), 1.0)
    assert not ran(big_dy, big_x, randn(34, K, dtype=torch.bfloat16, device="cuda"), randn(N, 34, dtype=torch.bfloat16, device="cuda"), 1.0)
    monkeypatch.setenv("LORA_FUSED_LORA_GRADS", "fused")
    assert ran(dy, x, a, b, 1.0)
    assert not ran(dy, x, a[:7], b[:, :7].contiguous(), 1.0)
    assert not ran(dy, x, randn(72, K, dtype=torch.bfloat16, device="cuda"), randn(N, 72, dtype=torch.bfloat16, device="cuda"), 1.0)
    assert not ran(dy[:, :124].contiguous(), x, a, b[:124].contiguous(), 1.0)
    assert not ran(dy.float(), x.float(), a.float(), b.float(), 1.0)
    assert not ran(randn(M, N + 8, dtype=torch.bfloat16, device="cuda")[:, :N], x, a, b, 1.0)
    assert not ran(dy, x, a, b, 1.0, None, True, False)  # no dB wanted: du alone is one GEMM
    monkeypatch.setenv("LORA_FUSED_LORA_GRADS", "gemm")
    assert not ran(big_dy, big_x, a, b, 1.0)
    monkeypatch.setenv("LORA_FUSED_LORA_GRADS", "yes")
    with pytest.raises(RuntimeError, match="LORA_FUSED_LORA_GRADS must be unset, fused or gemm; got 'yes'"):
        _ops.lora_adapter_grads(big_dy, big_x, a, b, 1.0)


@pytest.mark.parametrize("device,blas", DEVICE_BLAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_given_u_and_gradients_not_needed(device, blas, dtype, route):
    route(blas)
    M, K, N, r = 70, 136, 88, 8
    dy, x = randn(M, N, dtype=dtype, device=device), randn(M, K, dtype=dtype, device=device)
    a, b = randn(r, K, dtype=dtype, device=device), randn(N, r, dtype=dtype, device=device)
    u = randn(M, r, dtype=dtype, device=device)  # any u: dB must be dY^T u with that u, not a recomputed one
    du, dA, dB = _ops.lora_adapter_grads(dy, x, a, b, 2.0, u)
    assert_error_rule(dB, dy.double().t() @ u.double(), torch.mm(dy.t(), u), "dB from the given u")
    du2, dA2, dB2 = _ops.lora_adapter_grads(dy, x, a, b, 2.0, None, False, True)
    assert dA2.shape == (0, K) and dB2.shape == (N, r)
    assert torch.equal(du2, du)
    du3, dA3, dB3 = _ops.lora_adapter_grads(dy, x, a, b, 2.0, None, True, False)
    assert dA3.shape == (r, K) and dB3.shape == (0, r)
    assert torch.equal(dA3, dA) and torch.equal(du3, du)


@pytest.mark.parametrize("device,blas", DEVICE_BLAS)
def test_accumulating_column_blocks(device, blas, route):
    route(blas)
    # The GEMM route's accumulate-into-a-column-block case, as the NF4 slab loop uses it, through
    # gemm_concat_k (its composed path: a2 b2^T first, then a b^T added onto it).
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    M, K1, K2, N = 77, 264, 16, 200
    a, b = randn(M, K1, dtype=dtype, device=device), randn(N, K1, dtype=dtype, device=device)
    a2, b2 = randn(M, K2, dtype=dtype, device=device), randn(N, K2, dtype=dtype, device=device)
    out = _ops.gemm_concat_k(a, b, a2, b2)
    ref = a.double() @ b.double().t() + a2.double() @ b2.double().t()
    assert_error_rule(out, ref, a @ b.t() + a2 @ b2.t(), f"gemm_concat_k {device} {blas}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    dy, x = randn(6, 10, dtype=dtype, device=device), randn(6, 24, dtype=dtype, device=device)
    a, b = randn(4, 24, dtype=dtype, device=device), randn(10, 4, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.lora_fused.lora_adapter_grads.default, (dy, x, a, b, 0.5))
    torch.library.opcheck(torch.ops.lora_fused.lora_adapter_grads.default, (dy, x, a, b, 0.5, None, False, True))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_give_clear_errors(device):
    dy, x = randn(4, 6, device=device), randn(4, 8, device=device)
    a, b = randn(2, 8, device=device), randn(6, 2, device=device)
    with pytest.raises(ValueError, match=r"expected grad_out \[M, N\], x \[M, K\], lora_A \[r, K\], lora_B \[N, r\]"):
        _ops.lora_adapter_grads(dy, x, a, randn(5, 2, device=device), 1.0)
    with pytest.raises(ValueError, match="must have 2 dimensions"):
        _ops.lora_adapter_grads(dy, x.reshape(4, 2, 4), a, b, 1.0)
    with pytest.raises(ValueError, match="at least 1"):
        _ops.lora_adapter_grads(dy, x, randn(0, 8, device=device), randn(6, 0, device=device), 1.0)
    with pytest.raises(TypeError, match="same dtype"):
        _ops.lora_adapter_grads(dy, x, a.to(torch.bfloat16), b, 1.0)
    with pytest.raises(ValueError, match=r"u must be \[M, r\]"):
        _ops.lora_adapter_grads(dy, x, a, b, 1.0, randn(4, 3, device=device))
    if device == "cuda":
        with pytest.raises(RuntimeError, match="same device"):
            _ops.lora_adapter_grads(dy, x.cpu(), a, b, 1.0)
        assert torch.isfinite(_ops.lora_adapter_grads(dy, x, a, b, 1.0)[0]).all()
