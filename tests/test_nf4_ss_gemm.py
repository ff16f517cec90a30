"""nf4_linear, nf4_linear_grad_input and qlora_linear through the NF4 GEMM with a decoding warpgroup
(LORA_FUSED_NF4_GEMM=ss, Hopper only): forward, input gradient and the whole QLoRA step against
float64 with the exact decoded weight, with and without bias and LoRA (in the kernel when r % 8 == 0,
added after it otherwise), ragged M, N and K, strided inputs, plain and double-quantized absmax; and,
from the profiler, that the kernel ran where it applies and not where it does not."""

import subprocess
import sys

import pytest
import torch

import lora_fused
from lora_fused import _ops, nf4, reference
from conftest import HAS_CUDA, assert_error_rule, poison_allocator, randn

HOPPER = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0) and lora_fused.build_info()["sm90_gemm"]
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU and a build with the Hopper GEMMs")]

KERNEL = "nf4_ss_gemm_kernel"
# (M, N, K): M past the decode kernels' 16; one tile and many; M, N, K not multiples of the tiles
# (256 tokens, 128 features, 64 reduction columns), N = 8 (one partial tile), N % 8 != 0 (forward
# only: the backward needs 16-byte rows of dY and falls back to the slab path).
SHAPES = [(17, 96, 64), (300, 136, 320), (1000, 1008, 2048), (4097, 264, 1024), (33, 8, 64), (600, 100, 192)]


@pytest.fixture(autouse=True)
def _ss(monkeypatch):
    monkeypatch.setenv("LORA_FUSED_NF4_GEMM", "ss")


SMOKE = """
import os, torch, lora_fused
from lora_fused import nf4, _ops
os.environ["LORA_FUSED_NF4_GEMM"] = "ss"
p, s = nf4.quantize(torch.randn(264, 320, device="cuda") / 16)
x = torch.randn(300, 320, device="cuda", dtype=torch.bfloat16)
lora_fused.nf4_linear(x, p, s)
s2 = s.state2
_ops.nf4_linear_grad_input(torch.randn(300, 264, device="cuda", dtype=torch.bfloat16), p, s.absmax, s2.absmax, s2.code,
                           float(s.offset), 64, 256, 320)
torch.cuda.synchronize()
"""


@pytest.fixture(scope="module", autouse=True)
def _smoke():
    # One forward and one backward call in a child process first: a kernel that hangs (a pipeline
    # barrier never completing) fails this module in two minutes instead of hanging the test run.
    try:
        done = subprocess.run([sys.executable, "-c", SMOKE], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the NF4 SS GEMM did not finish a small forward and backward call in 120 s (hang?)")
    if done.returncode != 0:
        pytest.fail(f"the NF4 SS GEMM smoke run failed:\n{done.stderr[-2000:]}")


def _ss_launches(fn):
    """fn()'s result and how many times the SS kernel ran in it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, sum(1 for e in prof.events() if KERNEL in e.name)


def _weight(n, k, double_quant):
    return nf4.quantize(randn(n, k, device="cuda", scale=k**-0.5), blocksize=64, double_quant=double_quant)


def _args(packed, state, features):
    s2 = state.state2
    return (packed, state.absmax, s2.absmax if s2 else None, s2.code if s2 else None, state.offset or 0.0,
            state.blocksize, s2.blocksize if s2 else 256, features)


def _act(m, k, layout):
    if layout == "strided":  # every other column of a wider tensor
        return randn(m, 2 * k, dtype=torch.bfloat16, device="cuda")[:, ::2]
    return randn(m, k, dtype=torch.bfloat16, device="cuda")


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("r", [0, 16, 12])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_forward(M, N, K, r, bias, double_quant, layout):
    packed, state = _weight(N, K, double_quant)
    x = _act(M, K, layout)
    bias_t = randn(N, dtype=torch.bfloat16, device="cuda") if bias else None
    a = randn(r, K, dtype=torch.bfloat16, device="cuda", scale=K**-0.5) if r else None
    b = randn(N, r, dtype=torch.bfloat16, device="cuda", scale=0.25) if r else None
    w = nf4.dequantize(packed, state, torch.bfloat16)
    same = x @ w.t() + (bias_t if bias else 0) + (0.5 * ((x @ a.t()) @ b.t()) if r else 0)
    ref = reference.nf4_linear(x, packed, state, bias_t, a, b, 0.5) if r else reference.nf4_linear(x, packed, state, bias_t)
    what = f"ss forward M={M} {K}->{N} r={r} bias={bias} dq={double_quant} {layout}"
    poison_allocator("cuda")
    y, launches = _ss_launches(lambda: _ops.nf4_linear(x, *_args(packed, state, N), bias_t, None, b, a, 0.5))
    assert launches == 1, f"{what}: the SS kernel ran {launches} times"
    assert_error_rule(y, ref, same, what)
    if r:  # u given, as the layers' training forward passes it
        u = 0.5 * (x @ a.t())
        yu, launches = _ss_launches(lambda: _ops.nf4_linear(x, *_args(packed, state, N), bias_t, u, b))
        assert launches == 1, f"{what}, lora_u: the SS kernel ran {launches} times"
        assert_error_rule(yu, ref, x @ w.t() + (bias_t if bias else 0) + u @ b.t(), f"{what}, lora_u")


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("r,lora_form", [(0, None), (16, "du"), (16, "B"), (12, "du"), (12, "B")])
@pytest.mark.parametrize("double_quant", [True, False])
def test_grad_input(M, N, K, r, lora_form, double_quant):
    packed, state = _weight(N, K, double_quant)
    g = _act(M, N, "contiguous")
    a = randn(r, K, dtype=torch.bfloat16, device="cuda", scale=K**-0.5) if r else None
    b = randn(N, r, dtype=torch.bfloat16, device="cuda", scale=0.25) if r else None
    du = 0.5 * (g @ b) if r else None
    w = nf4.dequantize(packed, state, torch.bfloat16)
    w64 = reference.nf4_dequantize(packed, state).to("cuda")
    ref = g.double() @ w64 + ((0.5 * (g.double() @ b.double())) @ a.double() if r else 0)
    same = g @ w + (du @ a if r else 0)
    what = f"ss grad_input M={M} {K}->{N} r={r} {lora_form} dq={double_quant}"
    args = _args(packed, state, K)
    if lora_form != "B":  # du given (None without LoRA)
        call = lambda: _ops.nf4_linear_grad_input(g, *args, du, a, None, 0.5)  # noqa: E731
    else:
        call = lambda: _ops.nf4_linear_grad_input(g, *args, None, a, b, 0.5)  # noqa: E731
    poison_allocator("cuda")
    dx, launches = _ss_launches(call)
    assert launches == (1 if N % 8 == 0 else 0), f"{what}: the SS kernel ran {launches} times"
    assert_error_rule(dx, ref, same, what)


@pytest.mark.parametrize("M,N,K,r", [(300, 136, 320, 16), (1000, 1008, 2048, 64), (4097, 264, 1024, 8), (40, 96, 128, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_qlora_step(M, N, K, r, bias):
    # The layer's forward and backward as training runs them: both GEMMs on the SS kernel.
    packed, state = _weight(N, K, True)
    x = _act(M, K, "contiguous").requires_grad_()
    a = randn(r, K, dtype=torch.bfloat16, device="cuda", scale=K**-0.5).requires_grad_()
    b = randn(N, r, dtype=torch.bfloat16, device="cuda", scale=r**-0.5).requires_grad_()
    bias_t = randn(N, dtype=torch.bfloat16, device="cuda").requires_grad_() if bias else None
    params = [x, a, b] + ([bias_t] if bias else [])
    g = randn(M, N, dtype=torch.bfloat16, device="cuda")

    def step():
        y = lora_fused.qlora_linear(x, packed, state, a, b, 0.5, bias_t)
        return y, torch.autograd.grad(y, params, g)

    poison_allocator("cuda")
    (y, ours), launches = _ss_launches(step)
    assert launches == 2, f"qlora step M={M}: the SS kernel ran {launches} times (forward and input gradient expected)"
    w = nf4.dequantize(packed, state, torch.bfloat16)
    same = x @ w.t() + 0.5 * ((x @ a.t()) @ b.t()) + (bias_t if bias else 0)
    assert_error_rule(y.detach(), reference.nf4_linear(x, packed, state, bias_t, a, b, 0.5), same.detach(), "qlora fwd")
    p64 = [p.detach().double().requires_grad_() for p in params]
    ref = reference.nf4_linear(p64[0], packed, state, p64[3] if bias else None, p64[1], p64[2], 0.5)
    refs = torch.autograd.grad(ref, p64, g.double())
    torch_same = torch.autograd.grad(same, params, g)
    for name, o, r_, t in zip(("x", "lora_A", "lora_B", "bias"), ours, refs, torch_same):
        assert_error_rule(o, r_, t, f"qlora step M={M} grad {name}")


@pytest.mark.parametrize("splits", [2, 3, 100])
@pytest.mark.parametrize("M,N,K", [(40, 136, 320), (300, 1008, 2048), (513, 264, 1024)])
@pytest.mark.parametrize("direction", ["forward", "grad_input"])
def test_split_reduction(splits, M, N, K, direction, monkeypatch):
    # Forced split counts (100: clamped to the reduction's 64-column tiles): each split's fp32 sums
    # into the partials, the reduce kernel adds them (and the bias), LoRA in the last split.
    monkeypatch.setenv("LORA_FUSED_NF4_SS_SPLITS", str(splits))
    packed, state = _weight(N, K, True)
    r = 16
    a = randn(r, K, dtype=torch.bfloat16, device="cuda", scale=K**-0.5)
    b = randn(N, r, dtype=torch.bfloat16, device="cuda", scale=0.25)
    w = nf4.dequantize(packed, state, torch.bfloat16)
    what = f"ss {direction} splits={splits} M={M} {K}->{N}"
    if direction == "forward":
        x = _act(M, K, "strided")
        bias_t = randn(N, dtype=torch.bfloat16, device="cuda")
        ref = reference.nf4_linear(x, packed, state, bias_t, a, b, 0.5)
        same = x @ w.t() + bias_t + 0.5 * ((x @ a.t()) @ b.t())
        call = lambda: _ops.nf4_linear(x, *_args(packed, state, N), bias_t, None, b, a, 0.5)  # noqa: E731
    else:
        g = _act(M, N, "contiguous")
        w64 = reference.nf4_dequantize(packed, state).to("cuda")
        ref = g.double() @ w64 + (0.5 * (g.double() @ b.double())) @ a.double()
        same = g @ w + (0.5 * (g @ b)) @ a
        call = lambda: _ops.nf4_linear_grad_input(g, *_args(packed, state, K), None, a, b, 0.5)  # noqa: E731
    poison_allocator("cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = call()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert sum(KERNEL in nm for nm in names) == 1, f"{what}: the SS kernel ran {sum(KERNEL in nm for nm in names)} times"
    assert sum("nf4_ss_reduce_splits" in nm for nm in names) == 1, f"{what}: the split reduce kernel did not run once"
    assert_error_rule(out, ref, same, what)


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("M,N", [(33, 100), (300, 37)])
def test_split_reduction_with_features_not_a_multiple_of_4(splits, M, N, monkeypatch):
    # The partials' and the reduce kernel's element-wise paths (forward only: the input gradient needs
    # N % 8 == 0, and its features are K, a multiple of 64).
    monkeypatch.setenv("LORA_FUSED_NF4_SS_SPLITS", str(splits))
    K = 192
    packed, state = _weight(N, K, True)
    x = _act(M, K, "contiguous")
    bias_t = randn(N, dtype=torch.bfloat16, device="cuda")
    w = nf4.dequantize(packed, state, torch.bfloat16)
    poison_allocator("cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y = lora_fused.nf4_linear(x, packed, state, bias_t)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert sum("nf4_ss_reduce_splits" in nm for nm in names) == 1, f"M={M} N={N}: the split reduce kernel did not run once"
    assert_error_rule(y, reference.nf4_linear(x, packed, state, bias_t), x @ w.t() + bias_t, f"splits={splits} M={M} N={N}")


def test_bad_split_count_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LORA_FUSED_NF4_SS_SPLITS", "two")
    packed, state = _weight(136, 320, True)
    with pytest.raises(RuntimeError, match="LORA_FUSED_NF4_SS_SPLITS must be an integer >= 1; got 'two'"):
        lora_fused.nf4_linear(randn(40, 320, dtype=torch.bfloat16, device="cuda"), packed, state)


@pytest.mark.parametrize("M,N,K,expected", [(16, 320, 256, 0), (17, 320, 256, 1), (700, 320, 256, 1), (1024, 256, 256, 1),
                                             (1025, 320, 256, 0), (300, 264, 320, 0)])
def test_grad_input_takes_it_by_default_for_17_to_1024_rows(M, N, K, expected, monkeypatch):
    # LORA_FUSED_NF4_GEMM unset (auto): nf4_linear_grad_input runs this kernel for 17-1024 rows when
    # K <= N, the slab path otherwise; both correct.
    monkeypatch.delenv("LORA_FUSED_NF4_GEMM")
    packed, state = _weight(N, K, True)
    g = _act(M, N, "contiguous")
    dx, launches = _ss_launches(lambda: _ops.nf4_linear_grad_input(g, *_args(packed, state, K)))
    assert launches == expected, f"M={M} {K}->{N}: the SS kernel ran {launches} times, expected {expected}"
    w = nf4.dequantize(packed, state, torch.bfloat16)
    assert_error_rule(dx, g.double() @ reference.nf4_dequantize(packed, state).to("cuda"), g @ w, f"auto grad_input M={M}")


def test_falls_back_where_it_does_not_apply():
    # fp16 and blocksize 128 are not the kernel's: nf4_linear takes its other paths, and says nothing.
    packed, state = nf4.quantize(randn(96, 256, device="cuda", scale=1 / 16), blocksize=128)
    x = randn(40, 256, dtype=torch.bfloat16, device="cuda")
    y, launches = _ss_launches(lambda: lora_fused.nf4_linear(x, packed, state))
    assert launches == 0
    assert_error_rule(y, reference.nf4_linear(x, packed, state), x @ nf4.dequantize(packed, state, torch.bfloat16).t(),
                      "blocksize 128")
    packed, state = _weight(96, 256, True)
    x16 = randn(40, 256, dtype=torch.float16, device="cuda")
    y, launches = _ss_launches(lambda: lora_fused.nf4_linear(x16, packed, state))
    assert launches == 0
    assert_error_rule(y, reference.nf4_linear(x16, packed, state), x16 @ nf4.dequantize(packed, state, torch.float16).t(),
                      "fp16")
