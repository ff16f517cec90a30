"""nf4_linear and qlora_linear (functional), NF4Linear and QLoraLinear (modules): forward and
gradients against float64 with the exact decoded weight, both CUDA paths (the decode kernel for
M <= 16, the slab path beyond), opcheck, torch.compile, bitsandbytes Linear4bit interop, memory,
bad inputs, every subset of inputs needing gradients (CUDA graphs: test_cuda_graphs.py)."""

import itertools

import pytest
import torch

import lora_fused
from lora_fused import _ops, nf4, reference
from conftest import DEVICES, DTYPES, HAS_CUDA, assert_error_rule, poison_allocator, randn, requires_cuda

# (M, N, K): M <= 16 with K % 32 == 0 takes the CUDA decode kernel; on an H100/H200, bf16 with
# 17 <= M <= 1024, K % 64 == 0 and N % 8 == 0 the Hopper GEMM (the input gradient, with K <= N: the
# NF4 GEMM with a decoding warpgroup); the rest the slab path.
# N not a multiple of 16 or of a 64-row strip, K not a multiple of 128, odd K, one row.
SHAPES = [(1, 64, 128), (3, 269, 96), (8, 130, 4128), (9, 48, 160), (16, 1031, 256), (1, 17, 7), (17, 96, 64),
          (64, 257, 40), (129, 33, 544), (40, 136, 320), (130, 264, 1024)]


@pytest.fixture(params=["default", "slabs"])
def slab_mode(request, monkeypatch):
    # "slabs" makes the tiled path cut every weight into many small slabs (and odd ones), and takes
    # it where the Hopper GEMM would run (17-1024 bf16 rows, K % 64 == 0, N % 8 == 0, sm_90).
    if request.param == "slabs":
        monkeypatch.setenv("LORA_FUSED_NF4_SLAB_ELEMS", "3000")
        monkeypatch.setenv("LORA_FUSED_NF4_GEMM", "slab")
    return request.param


def _weight(n, k, device, blocksize=64, double_quant=True):
    w = randn(n, k, device=device, scale=k**-0.5)
    return nf4.quantize(w, blocksize=blocksize, double_quant=double_quant)


def _x(m, k, dtype, device, layout):
    if layout == "strided":  # every other column of a wider tensor
        return randn(m, 2 * k, dtype=dtype, device=device)[:, ::2]
    if layout == "transposed":
        return randn(k, m, dtype=dtype, device=device).t()
    return randn(m, k, dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_nf4_linear_forward_and_grad(device, dtype, M, N, K, slab_mode):
    packed, state = _weight(N, K, device)
    x = _x(M, K, dtype, device, "contiguous").requires_grad_()
    bias = randn(N, dtype=dtype, device=device).requires_grad_()
    poison_allocator(device)
    y = lora_fused.nf4_linear(x, packed, state, bias)
    w = nf4.dequantize(packed, state, dtype)
    same = x @ w.t() + bias
    assert_error_rule(y.detach(), reference.nf4_linear(x, packed, state, bias), same.detach(), "nf4_linear")
    g = randn(M, N, dtype=dtype, device=device)
    dx, db = torch.autograd.grad(y, (x, bias), g)
    tdx, tdb = torch.autograd.grad(same, (x, bias), g)
    w64 = reference.nf4_dequantize(packed, state).to(device)
    assert_error_rule(dx, g.double() @ w64, tdx, "grad x")
    assert_error_rule(db, g.double().sum(0), tdb, "grad bias")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,r", [(1, 64, 128, 1), (5, 269, 96, 16), (16, 130, 4128, 64), (7, 33, 40, 8),
                                     (64, 257, 160, 16), (300, 96, 64, 256)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
def test_qlora_linear_forward_and_gradients(device, dtype, M, N, K, r, bias, layout, slab_mode):
    packed, state = _weight(N, K, device)
    x = _x(M, K, dtype, device, layout).requires_grad_()
    a = randn(r, K, dtype=dtype, device=device, scale=K**-0.5).requires_grad_()
    b = randn(N, r, dtype=dtype, device=device, scale=r**-0.5).requires_grad_()
    bias_t = randn(N, dtype=dtype, device=device).requires_grad_() if bias else None
    params = [x, a, b] + ([bias_t] if bias else [])
    poison_allocator(device)
    y = lora_fused.qlora_linear(x, packed, state, a, b, 0.5, bias_t)
    w = nf4.dequantize(packed, state, dtype)
    same = x @ w.t() + 0.5 * ((x @ a.t()) @ b.t()) + (bias_t if bias else 0)
    assert_error_rule(y.detach(), reference.nf4_linear(x, packed, state, bias_t, a, b, 0.5), same.detach(), "qlora fwd")
    g = randn(M, N, dtype=dtype, device=device)
    ours = torch.autograd.grad(y, params, g)
    p64 = [p.detach().double().requires_grad_() for p in params]
    ref = reference.nf4_linear(p64[0], packed, state, p64[3] if bias else None, p64[1], p64[2], 0.5)
    refs = torch.autograd.grad(ref, p64, g.double())
    torch_same = torch.autograd.grad(same, params, g)
    for name, o, r_, t in zip(("x", "lora_A", "lora_B", "bias"), ours, refs, torch_same):
        assert o.dtype == dtype
        assert_error_rule(o, r_, t, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("M", [1, 12, 40])
def test_blocksizes_and_plain_absmax(device, blocksize, double_quant, M):
    packed, state = _weight(96, 4096 + 64, device, blocksize, double_quant)
    x = randn(M, 4096 + 64, dtype=torch.bfloat16, device=device)
    y = lora_fused.nf4_linear(x, packed, state)
    w = nf4.dequantize(packed, state, torch.bfloat16)
    assert_error_rule(y, reference.nf4_linear(x, packed, state), x @ w.t(), f"blocksize {blocksize}")


# Decode shapes for both CUDA decode kernels, each forced by LORA_FUSED_NF4_GEMV, and the default
# choice: the block-aligned one (blocksize 64, K % 256 == 0; it falls back to the general one
# elsewhere: K % 256 != 0, other blocksizes), with 16 and with 32 weight rows per warp step
# (LORA_FUSED_NF4_GEMV_ROWS; by default 32 from 2^25 weights up: the last case), and the general one. N not a multiple of 16, one strip
# per team and several (9605 and 5000 rows: more 16-row strips than an H100's 264 teams), K with
# idle warps (256 and 768 columns for 8 warps) and uneven steps per warp (2304 columns), M on both
# sides of 8 (one or two token tiles).
DECODE_CASES = [(1, 4096 + 1, 4096, 64), (1, 9605, 256, 64), (5, 333, 192, 64), (8, 47, 1024 + 64, 64), (9, 64, 256, 128),
                (16, 1000, 512, 256), (16, 1000, 512, 64), (3, 16, 4096, 4096), (12, 3000, 768, 64), (9, 5000, 2304, 64),
                (2, 77, 320, 32), (16, 8192 + 16, 4096, 64)]


# -nodefer: the strip sums with the team's barriers (LORA_FUSED_NF4_GEMV_DEFER=0) instead of deferred;
# -forward: every strip forwards over K (LORA_FUSED_NF4_GEMV_SERPENTINE=0) instead of alternately backwards.
DECODE_KERNELS = ["default", "general", "blockaligned-16rows", "blockaligned-32rows", "blockaligned-32rows-3slots",
                  "blockaligned-16rows-nodefer", "blockaligned-32rows-nodefer", "blockaligned-16rows-forward",
                  "blockaligned-32rows-forward"]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel,M,N,K,blocksize", [(kernel, *case) for kernel in DECODE_KERNELS for case in DECODE_CASES])
@pytest.mark.parametrize("double_quant", [True, False])
def test_decode_kernels(kernel, dtype, M, N, K, blocksize, double_quant, monkeypatch):
    if kernel != "default":
        monkeypatch.setenv("LORA_FUSED_NF4_GEMV", kernel.split("-")[0])
    if kernel.startswith("blockaligned-"):
        monkeypatch.setenv("LORA_FUSED_NF4_GEMV_ROWS", kernel.split("-")[1][:2])
    if kernel.endswith("-3slots"):  # three ring slots (two steps in flight a warp)
        monkeypatch.setenv("LORA_FUSED_NF4_GEMV_SLOTS", "3")
    if kernel.endswith("-nodefer"):
        monkeypatch.setenv("LORA_FUSED_NF4_GEMV_DEFER", "0")
    if kernel.endswith("-forward"):
        monkeypatch.setenv("LORA_FUSED_NF4_GEMV_SERPENTINE", "0")
    packed, state = _weight(N, K, "cuda", blocksize, double_quant)
    x = randn(M, K, dtype=dtype, device="cuda")
    bias = randn(N, dtype=dtype, device="cuda")
    a = randn(8, K, dtype=dtype, device="cuda", scale=K**-0.5)
    b = randn(N, 8, dtype=dtype, device="cuda", scale=0.5)
    poison_allocator("cuda")
    y = lora_fused.qlora_linear(x, packed, state, a, b, 0.5, bias, training=False)
    w = nf4.dequantize(packed, state, dtype)
    same = x @ w.t() + 0.5 * ((x @ a.t()) @ b.t()) + bias
    ref = reference.nf4_linear(x, packed, state, bias, a, b, 0.5)
    assert_error_rule(y, ref, same, f"decode {kernel}")
    y0 = lora_fused.nf4_linear(x, packed, state)
    assert_error_rule(y0, reference.nf4_linear(x, packed, state), x @ w.t(), f"decode {kernel}, no bias/LoRA")
    # u given (as in training): staged in shared memory by the block-aligned kernel.
    s2 = state.state2
    args = (packed, state.absmax, s2.absmax if s2 else None, s2.code if s2 else None, state.offset or 0.0,
            state.blocksize, s2.blocksize if s2 else 256, N)
    u = 0.5 * (x @ a.t())
    yu = _ops.nf4_linear(x, *args, bias, u, b)
    assert_error_rule(yu, reference.nf4_linear(x, packed, state, bias, a, b, 0.5), x @ w.t() + u @ b.t() + bias,
                      f"decode {kernel}, lora_u")


@requires_cuda
@pytest.mark.parametrize("env,message", [({"ROWS": "24"}, "LORA_FUSED_NF4_GEMV_ROWS must be 16 or 32 .*got '24'"),
                                         ({"ROWS": "32", "SLOTS": "5"}, "LORA_FUSED_NF4_GEMV_SLOTS must be 2 or 3 .*got '5'"),
                                         ({"DEFER": "2"}, "LORA_FUSED_NF4_GEMV_DEFER must be 0 or 1 .*got '2'"),
                                         ({"SERPENTINE": "yes"}, "LORA_FUSED_NF4_GEMV_SERPENTINE must be 0 or 1 .*got 'yes'"),
                                         ({"U_TOGETHER": "2"}, "LORA_FUSED_NF4_GEMV_U_TOGETHER must be 0 or 1 .*got '2'")])
def test_bad_decode_option_is_a_clear_error(env, message, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(f"LORA_FUSED_NF4_GEMV_{key}", value)
    packed, state = _weight(64, 256, "cuda")
    with pytest.raises(RuntimeError, match=message):
        lora_fused.nf4_linear(randn(4, 256, dtype=torch.bfloat16, device="cuda"), packed, state)


@requires_cuda
@pytest.mark.parametrize("rows,M", [("16", 1), ("16", 5), ("32", 1), ("32", 5), ("32", 16)])
# LoRA: none, staged in shared memory (from the shrink's partial sums, or u given; ranks 16 and 64,
# whose staged rows are padded to 24 and 72), or rank 12 (not a multiple of 8: from global memory).
@pytest.mark.parametrize("lora", ["none", "staged", "staged r64", "u given", "rank 12"])
def test_decode_deferred_strip_sums_are_bitwise_the_barriers(rows, M, lora, monkeypatch):
    # About 14 strips a team (57344 + 8 rows), so that the mbarrier phases of the two reduction
    # buffers and of the four lora_B buffers wrap several times; deferred, the sums add the same
    # numbers in the same order.
    monkeypatch.setenv("LORA_FUSED_NF4_GEMV_ROWS", rows)
    N, K = 57344 + 8, 512
    packed, state = _weight(N, K, "cuda")
    x = randn(M, K, dtype=torch.bfloat16, device="cuda")
    bias = randn(N, dtype=torch.bfloat16, device="cuda")
    r = {"rank 12": 12, "staged r64": 64}.get(lora, 16)
    a = randn(r, K, dtype=torch.bfloat16, device="cuda", scale=K**-0.5)
    b = randn(N, r, dtype=torch.bfloat16, device="cuda", scale=0.5)
    s2 = state.state2
    args = (packed, state.absmax, s2.absmax, s2.code, state.offset or 0.0, state.blocksize, s2.blocksize, N)

    def run():
        poison_allocator("cuda")
        if lora in ("staged", "staged r64", "rank 12"):
            return lora_fused.qlora_linear(x, packed, state, a, b, 0.5, bias, training=False)
        if lora == "u given":
            return _ops.nf4_linear(x, *args, bias, 0.5 * (x @ a.t()), b)
        return lora_fused.nf4_linear(x, packed, state, bias)

    got = run()
    monkeypatch.setenv("LORA_FUSED_NF4_GEMV_DEFER", "0")
    want = run()
    assert not want.isnan().any()
    assert torch.equal(got, want), (got - want).abs().max()


@requires_cuda
@pytest.mark.parametrize("rows,M", [("16", 1), ("16", 16), ("32", 1), ("32", 9), ("32", 16)])
@pytest.mark.parametrize("defer", ["0", "1"])
@pytest.mark.parametrize("serpentine", ["0", "1"])
def test_decode_serpentine_strips(rows, M, defer, serpentine, monkeypatch):
    # About 5 strips a team (20000 + 8 rows), 10 windows of K for 8 warps (two warps with 2 steps, so
    # that a backwards strip's order differs), the ring's copies running ahead across every turn.
    monkeypatch.setenv("LORA_FUSED_NF4_GEMV_ROWS", rows)
    monkeypatch.setenv("LORA_FUSED_NF4_GEMV_DEFER", defer)
    monkeypatch.setenv("LORA_FUSED_NF4_GEMV_SERPENTINE", serpentine)
    N, K = 20000 + 8, 2560
    packed, state = _weight(N, K, "cuda")
    x = randn(M, K, dtype=torch.bfloat16, device="cuda")
    bias = randn(N, dtype=torch.bfloat16, device="cuda")
    a = randn(16, K, dtype=torch.bfloat16, device="cuda", scale=K**-0.5)
    b = randn(N, 16, dtype=torch.bfloat16, device="cuda", scale=0.5)
    poison_allocator("cuda")
    y = lora_fused.qlora_linear(x, packed, state, a, b, 0.5, bias, training=False)
    w = nf4.dequantize(packed, state, torch.bfloat16)
    same = x @ w.t() + 0.5 * ((x @ a.t()) @ b.t()) + bias
    assert_error_rule(y, reference.nf4_linear(x, packed, state, bias, a, b, 0.5), same, "decode serpentine")
    y0 = lora_fused.nf4_linear(x, packed, state)
    assert_error_rule(y0, reference.nf4_linear(x, packed, state), x @ w.t(), "decode serpentine, no LoRA")


@requires_cuda
@pytest.mark.parametrize("rows", ["16", "32"])
@pytest.mark.parametrize("M", [1, 7, 9, 16])
@pytest.mark.parametrize("r", [32, 64, 128, 256])
@pytest.mark.parametrize("source", ["shrink", "u given"])
def test_decode_u_loaded_together_is_bitwise_one_by_one(rows, M, r, source, monkeypatch):
    # LORA_FUSED_NF4_GEMV_U_TOGETHER: the block-aligned kernel loads a thread's elements of u (all of
    # them up to 64 ranks, the rest one by one after) in one round trip, or (0) one by one; the same
    # numbers are added in the same order. u from the shrink's three partial sums (K = 9216) or given.
    monkeypatch.setenv("LORA_FUSED_NF4_GEMV_ROWS", rows)
    N, K = 1032, 9216
    packed, state = _weight(N, K, "cuda")
    x = randn(M, K, dtype=torch.bfloat16, device="cuda")
    bias = randn(N, dtype=torch.bfloat16, device="cuda")
    a = randn(r, K, dtype=torch.bfloat16, device="cuda", scale=K**-0.5)
    b = randn(N, r, dtype=torch.bfloat16, device="cuda", scale=r**-0.5)
    s2 = state.state2
    args = (packed, state.absmax, s2.absmax, s2.code, state.offset or 0.0, state.blocksize, s2.blocksize, N)
    u = 0.5 * (x @ a.t())

    def run():
        poison_allocator("cuda")
        if source == "shrink":
            return lora_fused.qlora_linear(x, packed, state, a, b, 0.5, bias, training=False)
        return _ops.nf4_linear(x, *args, bias, u, b)

    monkeypatch.setenv("LORA_FUSED_NF4_GEMV_U_TOGETHER", "1")
    got = run()
    w = nf4.dequantize(packed, state, torch.bfloat16)
    assert_error_rule(got, reference.nf4_linear(x, packed, state, bias, a, b, 0.5), x @ w.t() + u @ b.t() + bias,
                      f"decode, u loaded together, rows={rows} M={M} r={r} {source}")
    monkeypatch.setenv("LORA_FUSED_NF4_GEMV_U_TOGETHER", "0")
    want = run()
    assert not want.isnan().any()
    assert torch.equal(got, want), (got - want).abs().max()


@requires_cuda
# (tokens, rank, the warp steps the dispatch should take): under 2^25 weights 16-row steps unless they
# cannot stage the LoRA term in shared memory and 32-row steps can. Cases 2 KiB or more from the
# H100's and H200's 227 KiB either way, by SmemLayout's arithmetic: 16-row steps staging r = 64 for 9
# tokens or r = 128 for one need 229 KiB, r = 64 for 8 tokens 220.5 KiB (scripts/nf4_decode_smem_layout.py).
@pytest.mark.parametrize("M,r,rows", [(16, 64, "32"), (9, 64, "32"), (1, 128, "32"), (8, 64, "16"), (16, 16, "16"),
                                      (1, 16, "16")])
def test_decode_takes_32_row_steps_where_only_they_stage_the_lora_term(M, r, rows, monkeypatch):
    # The default dispatch gives bitwise the output of the forced configuration (a LoRA term read from
    # global memory, from u rounded to bf16, would differ in its last bits).
    N, K = 4096, 4096
    packed, state = _weight(N, K, "cuda")
    x = randn(M, K, dtype=torch.bfloat16, device="cuda")
    a = randn(r, K, dtype=torch.bfloat16, device="cuda", scale=K**-0.5)
    b = randn(N, r, dtype=torch.bfloat16, device="cuda", scale=r**-0.5)
    poison_allocator("cuda")
    got = lora_fused.qlora_linear(x, packed, state, a, b, 0.5, training=False)
    w = nf4.dequantize(packed, state, torch.bfloat16)
    assert_error_rule(got, reference.nf4_linear(x, packed, state, None, a, b, 0.5), x @ w.t() + 0.5 * ((x @ a.t()) @ b.t()),
                      f"decode M={M} r={r}")
    monkeypatch.setenv("LORA_FUSED_NF4_GEMV_ROWS", rows)
    poison_allocator("cuda")
    forced = lora_fused.qlora_linear(x, packed, state, a, b, 0.5, training=False)
    assert torch.equal(got, forced), (got - forced).abs().max()


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_adapters_on_a_bf16_model(device):
    packed, state = _weight(64, 96, device)
    x = randn(5, 96, dtype=torch.bfloat16, device=device)
    a = randn(8, 96, device=device, scale=0.1).requires_grad_()
    b = randn(64, 8, device=device, scale=0.1).requires_grad_()
    y = lora_fused.qlora_linear(x, packed, state, a, b, 2.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_masks_agree_forward_and_backward(device):
    # With W = 0 (all-zero blocks decode to 0), A = I and B = I the output is the dropped-out x
    # itself, and the gradient of x through the LoRA branch must use the same mask.
    k = 64
    packed, state = nf4.quantize(torch.zeros(k, k, device=device))
    eye = torch.eye(k, device=device)
    x = randn(4096, k, device=device).requires_grad_()
    y = lora_fused.qlora_linear(x, packed, state, eye, eye, 1.0, dropout_p=0.25)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.25) < 0.01
    torch.testing.assert_close(y[kept], x.detach()[kept] / 0.75)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)
    y_eval = lora_fused.qlora_linear(x, packed, state, eye, eye, 1.0, dropout_p=0.25, training=False)
    torch.testing.assert_close(y_eval, x.detach())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_output_can_be_modified_in_place(device, lead):
    # As for lora_linear: a model may scale or add into the layer's output in place.
    w = randn(16, 64, device=device)
    packed, state = nf4.quantize(w, 64)
    x = randn(*lead, 64, device=device).requires_grad_()
    a, b = randn(4, 64, device=device).requires_grad_(), randn(16, 4, device=device).requires_grad_()
    y = lora_fused.qlora_linear(x, packed, state, a, b, 2.0)
    y.mul_(3.0)
    g = randn(*lead, 16, device=device)
    got = torch.autograd.grad(y, (x, a, b), g)
    w_dq = nf4.dequantize(packed, state, torch.float32)
    ref = torch.autograd.grad(3.0 * (x @ w_dq.t() + 2.0 * (x @ a.t()) @ b.t()), (x, a, b), g)
    for ours, want in zip(got, ref):
        assert ours.shape == want.shape
        torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)
    z = lora_fused.nf4_linear(x, packed, state)
    z.add_(1.0)
    (dx,) = torch.autograd.grad(z, (x,), g)
    torch.testing.assert_close(dx, g @ w_dq, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    packed, state = _weight(40, 64, device)
    s2 = state.state2
    args = (packed, state.absmax, s2.absmax, s2.code, state.offset, state.blocksize, s2.blocksize)
    for m in (3, 20):
        x = randn(m, 64, dtype=torch.bfloat16, device=device).requires_grad_()
        u = randn(m, 4, dtype=torch.bfloat16, device=device).requires_grad_()
        b = randn(40, 4, dtype=torch.bfloat16, device=device).requires_grad_()
        bias = randn(40, dtype=torch.bfloat16, device=device).requires_grad_()
        torch.library.opcheck(torch.ops.lora_fused.nf4_linear.default, (x,) + args + (40, bias, u, b))
        torch.library.opcheck(torch.ops.lora_fused.nf4_linear.default, (x,) + args + (40, None, None, None))
        a4 = randn(4, 64, dtype=torch.bfloat16, device=device).requires_grad_()
        torch.library.opcheck(torch.ops.lora_fused.nf4_linear.default, (x,) + args + (40, bias, None, b, a4, 0.5))
        # nf4_linear_with_u has no autograd formula (qlora_linear's autograd.Function calls it).
        torch.library.opcheck(torch.ops.lora_fused.nf4_linear_with_u.default,
                              (x.detach(),) + args + (40, None, b.detach(), a4.detach(), 0.5))
        torch.library.opcheck(torch.ops.lora_fused.nf4_linear_with_u.default,
                              (x.detach(),) + args + (40, bias.detach(), b.detach(), a4.detach(), 0.5))
        g = randn(m, 40, dtype=torch.bfloat16, device=device)
        torch.library.opcheck(torch.ops.lora_fused.nf4_linear_grad_input.default, (g,) + args + (64,))
        du = randn(m, 4, dtype=torch.bfloat16, device=device)
        a = randn(4, 64, dtype=torch.bfloat16, device=device)
        torch.library.opcheck(torch.ops.lora_fused.nf4_linear_grad_input.default, (g,) + args + (64, du, a))
        bd = b.detach()  # nf4_linear_grad_input has no autograd formula (it is one)
        torch.library.opcheck(torch.ops.lora_fused.nf4_linear_grad_input.default, (g,) + args + (64, None, a, bd, 0.5))
        torch.library.opcheck(torch.ops.lora_fused.nf4_linear_grad_input.default,
                              (g,) + args + (64, (g @ bd).mul_(0.5), a, bd, 0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_modules_and_torch_compile_fullgraph(device):
    base = torch.nn.Linear(64, 48, device=device, dtype=torch.bfloat16)
    q = lora_fused.QLoraLinear.from_linear(base, r=4, lora_alpha=8)
    torch.nn.init.normal_(q.lora_B, std=0.1)
    nf = lora_fused.NF4Linear.from_linear(base)
    x = randn(3, 5, 64, dtype=torch.bfloat16, device=device).requires_grad_()
    backend = "aot_eager" if device == "cpu" else "inductor"
    for layer in (q, nf):
        y = torch.compile(layer, fullgraph=True, backend=backend)(x)
        torch.testing.assert_close(y, layer(x))
        y.float().sum().backward()
    assert q.lora_A.grad is not None and q.lora_B.grad is not None and x.grad is not None
    assert not q.weight.requires_grad and q.weight.grad is None
    # The LoRA term is what the module adds over the plain NF4 layer.
    with torch.no_grad():
        delta = q(x) - nf(x)
        want = q.scaling * (x @ q.lora_A.t()) @ q.lora_B.t()
    torch.testing.assert_close(delta, want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("device", DEVICES)
def test_module_state_dict_round_trip(device):
    layer = lora_fused.NF4Linear(96, 40, compute_dtype=torch.float32, device=device)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}
    other = lora_fused.NF4Linear(96, 40, compute_dtype=torch.float32, blocksize=128, double_quant=False, device=device)
    other.load_state_dict(sd)
    x = randn(7, 96, device=device)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    assert other.blocksize == 64 and other.quant_state.nested
    with pytest.raises(RuntimeError, match="cannot load the NF4 state"):
        lora_fused.NF4Linear(96, 41, device=device).load_state_dict(sd)


def _bnb_linear4bit(k, n, device, bias=True):
    bnb = pytest.importorskip("bitsandbytes")
    lin = torch.nn.Linear(k, n, bias=bias, dtype=torch.bfloat16)
    q = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    q.load_state_dict(lin.state_dict())
    return q.to(device), lin


@pytest.mark.parametrize("device", DEVICES)
def test_bitsandbytes_linear4bit_state_dicts_both_ways(device):
    # K = 128: bitsandbytes 0.50.2's own CPU dequantize_4bit decodes some shapes wrongly (a [40, 96]
    # weight it quantized itself comes back with errors of 2.0 where ours, from the same bytes, has
    # 0.39), so the comparison uses a shape its CPU path gets right.
    bnb = pytest.importorskip("bitsandbytes")
    q, lin = _bnb_linear4bit(128, 40, device)
    ours = lora_fused.NF4Linear(128, 40, device=device)
    ours.load_state_dict(q.state_dict())
    x = randn(6, 128, dtype=torch.bfloat16, device=device)
    w = nf4.dequantize(ours.weight, ours.quant_state)
    torch.testing.assert_close(w, bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state), rtol=0, atol=0)
    assert_error_rule(ours(x), reference.nf4_linear(x, ours.weight, ours.quant_state, q.bias), q(x), "bnb state dict in")
    # ... and the other way: a Linear4bit takes our state dict as transformers loads a pre-quantized
    # checkpoint into one, and decodes the same weight.
    mine = lora_fused.NF4Linear.from_linear(torch.nn.Linear(128, 40, dtype=torch.bfloat16, device=device))
    sd = mine.state_dict()
    q2 = bnb.nn.Linear4bit(128, 40, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    q2.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device=device, module=q2)
    q2.bias = torch.nn.Parameter(sd["bias"])
    assert_error_rule(q2(x), reference.nf4_linear(x, mine.weight, mine.quant_state, mine.bias), mine(x), "ours into bnb")
    torch.testing.assert_close(bnb.functional.dequantize_4bit(q2.weight.data, q2.weight.quant_state), mine.dequantize(q2.weight.quant_state.dtype),
                               rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_from_bnb_shares_the_storage(device):
    pytest.importorskip("bitsandbytes")
    q, _ = _bnb_linear4bit(64, 48, device)
    layer = lora_fused.QLoraLinear.from_bnb(q, r=4, lora_alpha=8)
    assert layer.weight.data_ptr() == q.weight.data_ptr() and layer.bias is q.bias
    x = randn(5, 64, dtype=torch.bfloat16, device=device)
    assert_error_rule(layer(x), reference.nf4_linear(x, layer.weight, layer.quant_state, q.bias), q(x), "from_bnb")
    with pytest.raises(ValueError, match="quantized bitsandbytes Linear4bit"):
        lora_fused.NF4Linear.from_bnb(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    packed, state = _weight(40, 64, device)
    assert lora_fused.nf4_linear(randn(0, 64, device=device), packed, state).shape == (0, 40)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_give_clear_errors(device):
    packed, state = _weight(40, 64, device)
    x = randn(4, 64, device=device)
    s2 = state.state2
    args = (packed, state.absmax, s2.absmax, s2.code, state.offset, state.blocksize, s2.blocksize)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 64\]"):
        lora_fused.nf4_linear(x[:, :63], packed, state)
    with pytest.raises(TypeError, match="x must be bfloat16, float16 or float32"):
        lora_fused.nf4_linear(x.double(), packed, state)
    with pytest.raises(TypeError, match="packed must hold uint8"):
        _ops.nf4_linear(x, packed.float(), *args[1:], 40)
    with pytest.raises(ValueError, match="packs into 1280 bytes"):
        _ops.nf4_linear(x, packed[:-1], *args[1:], 40)
    with pytest.raises(ValueError, match="need absmax of 40 values"):
        _ops.nf4_linear(x, packed, state.absmax[:-1], *args[2:], 40)
    with pytest.raises(ValueError, match="bias must have shape"):
        _ops.nf4_linear(x, *args, 40, randn(39, device=device))
    with pytest.raises(ValueError, match="lora_u and lora_B come together"):
        _ops.nf4_linear(x, *args, 40, None, randn(4, 2, device=device))
    with pytest.raises(TypeError, match="same dtype"):
        _ops.nf4_linear(x, *args, 40, randn(40, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match=r"grad_out must be \[M, N\]"):
        _ops.nf4_linear_grad_input(randn(4, 40, 1, device=device), *args, 64)
    g = randn(4, 40, device=device)
    with pytest.raises(ValueError, match="lora_du and lora_A come together"):
        _ops.nf4_linear_grad_input(g, *args, 64, randn(4, 2, device=device))
    with pytest.raises(ValueError, match=r"lora_du \[M, r\], lora_A \[r, 64\]"):
        _ops.nf4_linear_grad_input(g, *args, 64, randn(4, 2, device=device), randn(2, 63, device=device))
    with pytest.raises(TypeError, match="same dtype"):
        _ops.nf4_linear_grad_input(g, *args, 64, randn(4, 2, device=device), randn(2, 64, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="lora_B and lora_A come together"):
        _ops.nf4_linear_grad_input(g, *args, 64, None, None, randn(40, 2, device=device), 0.5)
    with pytest.raises(ValueError, match=r"lora_B \[n, r\], lora_A \[r, 64\]"):
        _ops.nf4_linear_grad_input(g, *args, 64, None, randn(2, 64, device=device), randn(39, 2, device=device), 0.5)
    with pytest.raises(ValueError, match=r"lora_B \[n, r\], lora_A \[r, 64\]"):
        _ops.nf4_linear_grad_input(g, *args, 64, None, randn(3, 64, device=device), randn(40, 2, device=device), 0.5)
    with pytest.raises(TypeError, match="same dtype"):
        _ops.nf4_linear_grad_input(g, *args, 64, None, randn(2, 64, device=device),
                                   randn(40, 2, dtype=torch.bfloat16, device=device), 0.5)
    with pytest.raises(TypeError, match="QuantState"):
        lora_fused.nf4_linear(x, packed, {"absmax": state.absmax})
    with pytest.raises(ValueError, match=r"expected lora_A \[r, 64\]"):
        lora_fused.qlora_linear(x, packed, state, randn(0, 64, device=device), randn(40, 0, device=device), 1.0)
    with pytest.raises(TypeError, match="compute_dtype"):
        lora_fused.NF4Linear(64, 40, compute_dtype=torch.int8)
    if HAS_CUDA:
        other = "cuda" if device == "cpu" else "cpu"
        with pytest.raises(RuntimeError, match="must be on"):
            _ops.nf4_linear(x.to(other), *args, 40)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("M", [256, 4096])
def test_peak_memory_is_one_slab_not_the_16bit_weight(M):
    # 4096 -> 11008: a slab is N*K/4 elements, so the extra memory of forward + backward must stay
    # near one slab (a quarter of the 16-bit weight), never the whole 16-bit weight. At 4096 tokens the
    # slabs are merged (the first one, decoded ahead to see whether the merging kernel applies, must
    # not stay alive beside the next) and the LoRA backward's partial sums (16 MB) come and go before.
    n, k = 11008, 4096
    layer = lora_fused.QLoraLinear(k, n, r=16, bias=False, device="cuda")
    x = randn(M, k, dtype=torch.bfloat16, device="cuda").requires_grad_()
    for _ in range(2):  # the second round runs with warm caches (cuBLAS workspace)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        y = layer(x)
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - start - 2 * y.numel() * 2 - dx.numel() * 2
        del y, dx
    slab = n * k // 4 * 2
    assert extra <= 1.1 * slab + (2 << 20), f"peak extra {extra / 2**20:.1f} MiB, one slab is {slab / 2**20:.1f} MiB"
    assert extra < 0.3 * n * k * 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("keep_u", [None, "1"])
def test_every_subset_of_inputs_needing_gradients(device, dropout, bias, keep_u, monkeypatch):
    """The layer's autograd node computes only the gradients asked for, and each one right, for every
    subset of x, lora_A, lora_B, bias that requires grad (frozen adapters, frozen inputs, ...), with
    u made again in the backward or kept from the forward (LORA_FUSED_QLORA_KEEP_U)."""
    if keep_u is None:
        monkeypatch.delenv("LORA_FUSED_QLORA_KEEP_U", raising=False)
    else:
        monkeypatch.setenv("LORA_FUSED_QLORA_KEEP_U", keep_u)
    M, K, N, r = 7, 64, 40, 4
    packed, state = _weight(N, K, device)
    w = nf4.dequantize(packed, state, torch.float32)
    for need in itertools.product([False, True], repeat=4):
        x = randn(M, K, device=device).requires_grad_(need[0])
        a = randn(r, K, device=device, scale=0.1).requires_grad_(need[1])
        b = randn(N, r, device=device, scale=0.1).requires_grad_(need[2])
        bias_t = randn(N, device=device).requires_grad_(need[3]) if bias else None
        torch.manual_seed(5)
        y = lora_fused.qlora_linear(x, packed, state, a, b, 0.7, bias_t, dropout_p=dropout)
        torch.manual_seed(5)  # the same seed, so the same dropout mask, for the reference
        if dropout:
            keep = _ops.lora_dropout(torch.ones_like(x), dropout, _ops.dropout_seed(x.device)) != 0
            xl = x * keep / (1 - dropout)
        else:
            xl = x
        ref = x @ w.t() + 0.7 * (xl @ a.t()) @ b.t() + (bias_t if bias else 0)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        wanted = [t for t in (x, a, b, bias_t) if t is not None and t.requires_grad]
        assert y.requires_grad == bool(wanted)
        if wanted:
            g = randn(M, N, device=device)
            for got, want in zip(torch.autograd.grad(y, wanted, g), torch.autograd.grad(ref, wanted, g)):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"needs {need}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "M,N,K,dtype",
    [(1, 269, 256, torch.bfloat16), (16, 1031, 512, torch.bfloat16), (3, 130, 2304, torch.float16),
     (9, 77, 1280, torch.bfloat16), (2, 40, 9216, torch.bfloat16), (5, 64, 96, torch.bfloat16),
     (20, 40, 64, torch.bfloat16)],
)
@pytest.mark.parametrize("r", [1, 8, 12, 16, 64, 128, 136, 256])
def test_nf4_linear_computes_the_lora_shrink(device, M, N, K, dtype, r):
    # nf4_linear with lora_A (and lora_scale) in place of lora_u: u = s x A^T made by the op. On CUDA
    # where the block-aligned decode kernel applies (K % 256 == 0, M <= 16) and r % 8 == 0: partial
    # sums over slices of K (2304: three of 1024 columns, the last partial; 9216: eight, the most) from a small kernel, added by
    # the decode kernel; elsewhere by a separate GEMM. Forward against float64, and the gradients of
    # x, A, B through the op's autograd formula.
    packed, state = _weight(N, K, device)
    s2 = state.state2
    args = (packed, state.absmax, s2.absmax, s2.code, state.offset, state.blocksize, s2.blocksize, N)
    x = randn(M, K, dtype=dtype, device=device).requires_grad_()
    a = randn(r, K, dtype=dtype, device=device, scale=K**-0.5).requires_grad_()
    b = randn(N, r, dtype=dtype, device=device, scale=0.5).requires_grad_()
    bias = randn(N, dtype=dtype, device=device)
    poison_allocator(device)
    y = _ops.nf4_linear(x, *args, bias, None, b, a, 0.75)
    w = nf4.dequantize(packed, state, dtype)
    same = x @ w.t() + 0.75 * ((x @ a.t()) @ b.t()) + bias
    ref = reference.nf4_linear(x.detach(), packed, state, bias, a.detach(), b.detach(), 0.75)
    assert_error_rule(y, ref, same, f"nf4_linear with lora_A, r={r}")
    g = randn(M, N, dtype=dtype, device=device)
    got = torch.autograd.grad(y, (x, a, b), g)
    want = torch.autograd.grad(same, (x, a, b), g)
    wd, xd, ad, bd, gd = w.double(), x.detach().double(), a.detach().double(), b.detach().double(), g.double()
    exact = (gd @ wd + 0.75 * (gd @ bd) @ ad, 0.75 * (gd @ bd).t() @ xd, 0.75 * gd.t() @ (xd @ ad.t()))
    for name, gt, wt, ex in zip(("x", "A", "B"), got, want, exact):
        assert_error_rule(gt, ex, wt, f"grad {name}, r={r}")


@pytest.mark.parametrize("device", DEVICES)
def test_nf4_linear_lora_a_bad_inputs(device):
    packed, state = _weight(40, 64, device)
    s2 = state.state2
    args = (packed, state.absmax, s2.absmax, s2.code, state.offset, state.blocksize, s2.blocksize, 40)
    x = randn(4, 64, device=device)
    a, b, u = randn(4, 64, device=device), randn(40, 4, device=device), randn(4, 4, device=device)
    with pytest.raises(ValueError, match="give lora_u or lora_A"):
        _ops.nf4_linear(x, *args, None, u, b, a, 1.0)
    with pytest.raises(ValueError, match="lora_A and lora_B come together"):
        _ops.nf4_linear(x, *args, None, None, None, a, 1.0)
    with pytest.raises(ValueError, match=r"lora_A \[r, k\]"):
        _ops.nf4_linear(x, *args, None, None, b, a[:, :63], 1.0)
    with pytest.raises(ValueError, match=r"lora_A \[r, k\]"):
        _ops.nf4_linear(x, *args, None, None, b[:, :3], a, 1.0)


# (M, N, K, r, blocksize): one token, odd N, K not a multiple of 64 (the merging decode kernel's
# column strip; the decode-then-GEMM merge instead) or of 128, M above and below K, r not a multiple
# of 16, r = 80 and 24 (the kernel's k-steps of 16: 1, 2, 4, 8), odd r (lora_B read by elements),
# blocksize 32 (two quantization blocks per strip row) and 128, and N = 4001 with K = 4160: warps
# walking several 16-row tiles of a strip, the last one partial.
MERGE_SHAPES = [(1, 64, 128, 4, 64), (33, 130, 96, 16, 64), (64, 257, 192, 8, 64), (300, 96, 64, 64, 64),
                (40, 72, 4160, 80, 64), (50, 200, 256, 24, 64), (17, 70, 128, 7, 32), (9, 300, 640, 16, 128),
                (5, 4001, 4160, 16, 64), (2048, 130, 256, 16, 64)]


def _slab_path(monkeypatch, merge, slab_elems):
    """The slab path (not the Hopper GEMM), LORA_FUSED_NF4_MERGE = merge (None: unset), and slabs of
    slab_elems weights (None: the default size)."""
    if merge is None:
        monkeypatch.delenv("LORA_FUSED_NF4_MERGE", raising=False)
    else:
        monkeypatch.setenv("LORA_FUSED_NF4_MERGE", merge)
    monkeypatch.setenv("LORA_FUSED_NF4_GEMM", "slab")
    if slab_elems is not None:
        monkeypatch.setenv("LORA_FUSED_NF4_SLAB_ELEMS", str(slab_elems))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,r,blocksize", MERGE_SHAPES)
@pytest.mark.parametrize("merge", ["1", "gemm", "0", None])
@pytest.mark.parametrize("slabs", ["one", "many"])
def test_lora_term_merged_into_the_slabs(device, dtype, M, N, K, r, blocksize, merge, slabs, monkeypatch):
    # LORA_FUSED_NF4_MERGE forces the LoRA term into each decoded slab of W (x (W + s B A)^T forward,
    # dY (W + s B A) backward), by the merging decode kernel (1; on CUDA where it applies) or a GEMM
    # over the decoded slab (gemm; on CPU both are that), beside the slab GEMMs (0), or unset: by the
    # kernel where it applies and M >= 2048 (the M = 2048 shape, on CUDA), beside elsewhere.
    # "many": slabs of 40000 weights, so 9-row slabs at K = 4160 and 128-576-column ones backward.
    _slab_path(monkeypatch, merge, 40000 if slabs == "many" else None)
    packed, state = _weight(N, K, device, blocksize=blocksize)
    x = randn(M, K, dtype=dtype, device=device).requires_grad_()
    a = randn(r, K, dtype=dtype, device=device, scale=K**-0.5).requires_grad_()
    b = randn(N, r, dtype=dtype, device=device, scale=r**-0.5).requires_grad_()
    bias = randn(N, dtype=dtype, device=device).requires_grad_()
    params = (x, a, b, bias)
    poison_allocator(device)
    y = lora_fused.qlora_linear(x, packed, state, a, b, 0.5, bias)
    w = nf4.dequantize(packed, state, dtype)
    same = x @ w.t() + 0.5 * ((x @ a.t()) @ b.t()) + bias
    assert_error_rule(y.detach(), reference.nf4_linear(x, packed, state, bias, a, b, 0.5), same.detach(), "fwd")
    g = randn(M, N, dtype=dtype, device=device)
    p64 = [p.detach().double().requires_grad_() for p in params]
    refs = torch.autograd.grad(reference.nf4_linear(p64[0], packed, state, p64[3], p64[1], p64[2], 0.5), p64, g.double())
    for name, o, r_, t in zip(("x", "A", "B", "bias"), torch.autograd.grad(y, params, g), refs,
                              torch.autograd.grad(same, params, g)):
        assert o.dtype == dtype
        assert_error_rule(o, r_, t, f"grad {name}")
    # The op alone: lora_B (with lora_scale) in place of lora_du, and both together.
    s2 = state.state2
    args = (packed, state.absmax, s2.absmax, s2.code, state.offset, state.blocksize, s2.blocksize, K)
    ad, bd = a.detach(), b.detach()
    du = (g @ bd).mul_(0.5)
    exact = g.double() @ (w.double() + 0.5 * bd.double() @ ad.double())
    torch_dx = g @ w + du @ ad
    for lora in ((None, ad, bd, 0.5), (du, ad, bd, 0.5)):
        assert_error_rule(_ops.nf4_linear_grad_input(g, *args, *lora), exact, torch_dx, "nf4_linear_grad_input")


# (M, N, K, r): r = 64 filling the columns after the first 32-row slab exactly ("many": 3000-weight
# slabs), 20 one-row slabs with r = 24 (u does not fit beside the first slab: a GEMM of its own),
# odd r, K not a multiple of 64 (no merging decode kernel), M = 2048 (merged by default on CUDA).
WITH_U_SHAPES = [(1, 64, 128, 4), (33, 130, 96, 16), (300, 96, 64, 64), (17, 70, 128, 7), (40, 20, 4160, 24),
                 (2048, 130, 256, 16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,r", WITH_U_SHAPES)
@pytest.mark.parametrize("merge", ["1", "gemm", "0", None])
@pytest.mark.parametrize("slabs", ["one", "many"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_nf4_linear_with_u_returns_u_for_the_backward(device, dtype, M, N, K, r, merge, slabs, with_bias, monkeypatch):
    # nf4_linear_with_u: nf4_linear's output with lora_A, and u = s x A^T, which qlora_linear keeps for
    # dB. Merged, without a bias and with room beside the first slab, u comes out of that slab's GEMM
    # (lora_A as extra rows of the slab, written into the next slab's columns before its GEMM).
    _slab_path(monkeypatch, merge, 3000 if slabs == "many" else None)
    packed, state = _weight(N, K, device)
    x = randn(M, K, dtype=dtype, device=device)
    a = randn(r, K, dtype=dtype, device=device, scale=K**-0.5)
    b = randn(N, r, dtype=dtype, device=device, scale=r**-0.5)
    bias = randn(N, dtype=dtype, device=device) if with_bias else None
    s2 = state.state2
    args = (packed, state.absmax, s2.absmax, s2.code, state.offset, state.blocksize, s2.blocksize, N)
    poison_allocator(device)
    y, u = _ops.nf4_linear_with_u(x, *args, bias, b, a, 0.5)
    w = nf4.dequantize(packed, state, dtype)
    same = x @ w.t() + 0.5 * ((x @ a.t()) @ b.t()) + (bias if with_bias else 0)
    assert_error_rule(y, reference.nf4_linear(x, packed, state, bias, a, b, 0.5), same, "out")
    assert u.dtype == dtype and u.is_contiguous()
    assert_error_rule(u, 0.5 * (x.double() @ a.double().t()), (x @ a.t()) * 0.5, "u")
    if with_bias:
        return
    # qlora_linear's gradients with u kept from the forward (no bias: the first slab's GEMM makes it).
    monkeypatch.setenv("LORA_FUSED_QLORA_KEEP_U", "1")
    params = [t.clone().requires_grad_() for t in (x, a, b)]
    g = randn(M, N, dtype=dtype, device=device)
    grads = torch.autograd.grad(lora_fused.qlora_linear(params[0], packed, state, params[1], params[2], 0.5), params, g)
    p64 = [t.double().requires_grad_() for t in (x, a, b)]
    refs = torch.autograd.grad(reference.nf4_linear(p64[0], packed, state, None, p64[1], p64[2], 0.5), p64, g.double())
    pt = [t.clone().requires_grad_() for t in (x, a, b)]
    torch_grads = torch.autograd.grad(pt[0] @ w.t() + 0.5 * ((pt[0] @ pt[1].t()) @ pt[2].t()), pt, g)
    for name, o, r_, t in zip(("x", "A", "B"), grads, refs, torch_grads):
        assert_error_rule(o, r_, t, f"grad {name}")


def test_an_unknown_keep_u_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("LORA_FUSED_QLORA_KEEP_U", "yes")
    packed, state = _weight(64, 128, "cpu")
    x = randn(3, 128).requires_grad_()
    a, b = randn(4, 128).requires_grad_(), randn(64, 4).requires_grad_()
    with pytest.raises(ValueError, match="LORA_FUSED_QLORA_KEEP_U must be unset, 0 or 1; got 'yes'"):
        lora_fused.qlora_linear(x, packed, state, a, b, 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_nf4_linear_with_u_of_no_rows(device):
    packed, state = _weight(64, 128, device)
    s2 = state.state2
    args = (packed, state.absmax, s2.absmax, s2.code, state.offset, state.blocksize, s2.blocksize, 64)
    x, a, b = randn(0, 128, device=device), randn(4, 128, device=device), randn(64, 4, device=device)
    y, u = _ops.nf4_linear_with_u(x, *args, None, b, a, 0.5)
    assert y.shape == (0, 64) and u.shape == (0, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_an_unknown_merge_setting_is_an_error(device, monkeypatch):
    monkeypatch.setenv("LORA_FUSED_NF4_MERGE", "yes")
    monkeypatch.setenv("LORA_FUSED_NF4_GEMM", "slab")
    packed, state = _weight(64, 128, device)
    x, a, b = randn(3, 128, device=device), randn(4, 128, device=device), randn(64, 4, device=device)
    with pytest.raises(RuntimeError, match="LORA_FUSED_NF4_MERGE must be unset, 0, 1 or gemm; got 'yes'"):
        lora_fused.qlora_linear(x, packed, state, a, b, 0.5)


HOPPER = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0) and lora_fused.build_info()["sm90_gemm"]


@pytest.mark.cuda
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU and a build with the Hopper GEMMs")
@pytest.mark.parametrize("M,N,K,mode", [(17, 96, 64, "auto"), (200, 136, 320, "auto"), (512, 264, 1024, "auto"),
                                        (600, 72, 128, "auto"), (40, 1008, 2048, "auto"),
                                        (129, 8, 64, "auto"), (1024, 40, 4096, "auto"), (1500, 24, 192, "sm90")])
@pytest.mark.parametrize("lora", [False, True])
def test_hopper_gemm_path(M, N, K, mode, lora, monkeypatch):
    # nf4_linear (and qlora_linear's forward) through the NF4 CUTLASS GEMM: against float64 and
    # PyTorch on the bf16-dequantized weight, and beside the slab path forced on the same inputs.
    packed, state = _weight(N, K, "cuda")
    x = randn(M, K, dtype=torch.bfloat16, device="cuda")
    bias = randn(N, dtype=torch.bfloat16, device="cuda")
    a = randn(16, K, dtype=torch.bfloat16, device="cuda", scale=K**-0.5) if lora else None
    b = randn(N, 16, dtype=torch.bfloat16, device="cuda", scale=0.25) if lora else None
    w = nf4.dequantize(packed, state, torch.bfloat16)
    same = x @ w.t() + bias + (0.5 * ((x @ a.t()) @ b.t()) if lora else 0)
    ref = reference.nf4_linear(x, packed, state, bias, a, b, 0.5) if lora else reference.nf4_linear(x, packed, state, bias)
    run = (lambda: lora_fused.qlora_linear(x, packed, state, a, b, 0.5, bias)) if lora else (
        lambda: lora_fused.nf4_linear(x, packed, state, bias))
    monkeypatch.setenv("LORA_FUSED_NF4_GEMM", mode)
    poison_allocator("cuda")
    y = run()
    assert_error_rule(y, ref, same, f"Hopper GEMM path M={M} {K}->{N} lora={lora}")
    monkeypatch.setenv("LORA_FUSED_NF4_GEMM", "slab")
    assert_error_rule(run(), ref, same, f"slab path M={M} {K}->{N} lora={lora}")
    monkeypatch.setenv("LORA_FUSED_NF4_GEMM", "bogus")
    with pytest.raises(RuntimeError, match="LORA_FUSED_NF4_GEMM must be auto, sm90, slab or ss; got 'bogus'"):
        run()
