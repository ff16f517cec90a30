"""lora_linear (functional) and LoraLinear (module): forward and gradients against float64,
dropout, merge/unmerge, PEFT's parameterisation, torch.compile, bad inputs."""

import math

import pytest
import torch

import lora_fused
from lora_fused import reference
from conftest import DEVICES, DTYPES, assert_error_rule, randn


def _layer_inputs(lead, k, d, r, dtype, device, bias=True):
    x = randn(*lead, k, dtype=dtype, device=device)
    w = randn(d, k, dtype=dtype, device=device, scale=k**-0.5)
    a = randn(r, k, dtype=dtype, device=device, scale=k**-0.5)
    b = randn(d, r, dtype=dtype, device=device, scale=r**-0.5)
    bias_t = randn(d, dtype=dtype, device=device) if bias else None
    return x, w, a, b, bias_t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lead,k,d,r",
    [((1,), 33, 17, 1), ((2, 7), 64, 96, 8), ((64,), 129, 65, 16), ((3, 5, 7), 40, 24, 64), ((300,), 136, 264, 16),
     ((5, 41), 256, 520, 8)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients(device, dtype, lead, k, d, r, bias, gemm_path):
    if device == "cpu" and gemm_path == "sm90":
        pytest.skip("the path switch is the CUDA op's; CPU is covered by the 'default' case")
    x, w, a, b, bias_t = _layer_inputs(lead, k, d, r, dtype, device, bias)
    params = [t.requires_grad_() for t in (x, a, b) + ((bias_t,) if bias else ())]
    y = lora_fused.lora_linear(x, w, a, b, 0.5, bias_t)
    ref = reference.lora_linear(x, w, a, b, 0.5, bias_t)
    same_dtype = x @ w.t() + 0.5 * ((x @ a.t()) @ b.t()) + (bias_t if bias else 0)
    assert_error_rule(y.detach(), ref, same_dtype.detach(), "lora_linear forward")

    g = randn(*y.shape, dtype=dtype, device=device)
    ours = torch.autograd.grad(y, params, g)
    p64 = [p.detach().double().requires_grad_() for p in params]
    ref64 = reference.lora_linear(p64[0], w, p64[1], p64[2], 0.5, p64[3] if bias else None)
    refs = torch.autograd.grad(ref64, p64, g.double())
    torch_same = torch.autograd.grad(same_dtype, params, g)
    for name, o, r_, t in zip(("x", "lora_A", "lora_B", "bias"), ours, refs, torch_same):
        assert o.dtype == dtype
        assert_error_rule(o, r_, t, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_weight_never_gets_a_gradient(device):
    x, w, a, b, bias_t = _layer_inputs((4,), 16, 8, 2, torch.float32, device)
    w.requires_grad_()
    a.requires_grad_()
    lora_fused.lora_linear(x, w, a, b, 1.0, bias_t).sum().backward()
    assert w.grad is None and a.grad is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_on_the_lora_branch(device, p):
    # Identity adapters make the branch's output the dropped-out input itself: each element is 0 or
    # x / (1 - p), zeros at rate p, and backward must use the same mask as forward.
    n, k = 4096, 8
    x = (torch.rand(n, k) + 0.5).to(device).requires_grad_()
    w = randn(k, k, device=device)
    eye = torch.eye(k, device=device)
    y = lora_fused.lora_linear(x, w, eye, eye, 1.0, dropout_p=p, training=True)
    dropped = (y - x @ w.t()).detach()
    kept = dropped.abs() > 1e-3
    torch.testing.assert_close(dropped[kept], (x / (1 - p)).detach()[kept], rtol=1e-5, atol=1e-5)
    assert (dropped[~kept].abs() < 1e-5).all()
    rate, sigma = (~kept).float().mean().item(), (p * (1 - p) / kept.numel()) ** 0.5
    assert abs(rate - p) < 5 * sigma, f"zero rate {rate:.4f}, expected {p} +- {5 * sigma:.4f}"
    g = randn(n, k, device=device)
    (dx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(dx, g @ w + kept.float() * g / (1 - p), rtol=1e-5, atol=1e-5)
    y_eval = lora_fused.lora_linear(x, w, eye, eye, 1.0, dropout_p=p, training=False)
    torch.testing.assert_close(y_eval, x @ w.t() + x)


@pytest.mark.parametrize("device", DEVICES)
def test_module_matches_peft_parameterisation(device):
    lin = torch.nn.Linear(48, 24, device=device)
    layer = lora_fused.LoraLinear.from_linear(lin, r=8, lora_alpha=16)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert not layer.weight.requires_grad and layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(48)  # kaiming_uniform(a=sqrt(5)) bound for fan_in 48
    assert layer.lora_A.abs().max() <= bound + 1e-6
    rs = lora_fused.LoraLinear(48, 24, r=16, lora_alpha=8, use_rslora=True, init_lora_weights="gaussian", device=device)
    assert rs.scaling == 8 / 4
    x = randn(5, 48, device=device)
    torch.testing.assert_close(layer(x), lin(x))  # B = 0: the adapter starts as a no-op
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"weight", "bias", "lora_A", "lora_B"}


@pytest.mark.parametrize("device", DEVICES)
def test_merge_unmerge(device):
    layer = lora_fused.LoraLinear(40, 30, r=4, lora_alpha=8, dtype=torch.float32, device=device)
    torch.nn.init.normal_(layer.lora_B)
    x = randn(6, 40, device=device)
    y = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    # fp32: (w + d) - d is w to the last bit whenever w + d is exact; allow one ulp of the merged weight.
    ulp = torch.finfo(torch.float32).eps * (w0.abs() + layer.delta_weight().abs())
    assert ((layer.weight - w0).abs() <= ulp).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_output_can_be_modified_in_place(device, lead):
    # Models scale or add into a linear's output in place; the autograd node's output must allow it
    # (a view made inside a custom Function would not) and the gradients must still be right.
    x = randn(*lead, 24, device=device).requires_grad_()
    w, a, b = randn(16, 24, device=device), randn(4, 24, device=device).requires_grad_(), randn(16, 4, device=device).requires_grad_()
    y = lora_fused.lora_linear(x, w, a, b, 2.0)
    y.mul_(3.0)
    g = randn(*lead, 16, device=device)
    got = torch.autograd.grad(y, (x, a, b), g)
    ref = torch.autograd.grad(3.0 * reference.lora_linear(x, w, a, b, 2.0), (x, a, b), g)
    for ours, want in zip(got, ref):
        assert ours.shape == want.shape
        torch.testing.assert_close(ours, want.to(ours.dtype), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    layer = lora_fused.LoraLinear(32, 16, r=4, device=device)
    torch.nn.init.normal_(layer.lora_B)
    x = randn(3, 5, 32, device=device, dtype=torch.float32).requires_grad_()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    y = compiled(x)
    torch.testing.assert_close(y, layer(x))
    y.sum().backward()
    assert layer.lora_A.grad is not None and x.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_give_clear_errors(device):
    x, w, a, b, bias_t = _layer_inputs((4,), 16, 8, 2, torch.float32, device)
    with pytest.raises(ValueError, match=r"expected x \[\.\.\., k\]"):
        lora_fused.lora_linear(x[:, :15], w, a, b, 1.0)
    with pytest.raises(ValueError, match="bias must have shape"):
        lora_fused.lora_linear(x, w, a, b, 1.0, bias_t[:7])
    with pytest.raises(ValueError, match="dropout_p"):
        lora_fused.lora_linear(x, w, a, b, 1.0, dropout_p=1.0)
    with pytest.raises(TypeError, match="same dtype"):
        lora_fused.lora_linear(x.double(), w, a, b, 1.0)
    with pytest.raises(ValueError, match="r must be at least 1"):
        lora_fused.LoraLinear(16, 8, r=0)
