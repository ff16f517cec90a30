"""Run to run, the same inputs give bit-identical outputs and gradients for every layer, on every
path (decode kernels at M <= 16, the slab/cuBLAS path beyond; dropout under the same seed).

lora_fused's kernels use no atomics and reduce in a fixed order, and cuBLAS is bit-reproducible for
a given GPU model, toolkit and stream (see README, "Numerical guarantees")."""

import pytest
import torch

import lora_fused
from conftest import DEVICES, randn
from lora_fused import nf4


def _run(fn, inputs, seed):
    torch.manual_seed(seed)
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    y = fn(*leaves)
    g = torch.ones_like(y) if y.requires_grad else None
    grads = torch.autograd.grad(y, [t for t in leaves if t.requires_grad], g) if g is not None else ()
    return [y.detach()] + list(grads)


def _bitwise_equal(a, b, what):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{what}: result {i} differs between two runs (max diff {(x.float() - y.float()).abs().max()})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M", [1, 7, 16, 300])
@pytest.mark.parametrize("op,dropout", [("lora_linear", 0.0), ("lora_linear", 0.1), ("nf4_linear", 0.0),
                                        ("qlora_linear", 0.0), ("qlora_linear", 0.1)])
@pytest.mark.parametrize("grad", [True, False])
def test_same_inputs_same_bits(device, M, op, grad, dropout):
    dt = torch.bfloat16
    k, n, r = 512, 392, 16
    x = randn(M, k, dtype=dt, device=device).requires_grad_(grad)
    a = randn(r, k, dtype=dt, device=device, scale=k**-0.5).requires_grad_(grad)
    b = randn(n, r, dtype=dt, device=device, scale=r**-0.5).requires_grad_(grad)
    bias = randn(n, dtype=dt, device=device).requires_grad_(grad)
    if op == "lora_linear":
        w = randn(n, k, dtype=dt, device=device, scale=k**-0.5)
        fn = lambda x, a, b, bias: lora_fused.lora_linear(x, w, a, b, 0.5, bias, dropout_p=dropout)  # noqa: E731
        inputs = (x, a, b, bias)
    else:
        packed, state = nf4.quantize(randn(n, k, device=device, scale=k**-0.5))
        if op == "nf4_linear":
            fn = lambda x, bias: lora_fused.nf4_linear(x, packed, state, bias)  # noqa: E731
            inputs = (x, bias)
        else:
            fn = lambda x, a, b, bias: lora_fused.qlora_linear(x, packed, state, a, b, 0.5, bias, dropout_p=dropout)  # noqa: E731
            inputs = (x, a, b, bias)
    with torch.set_grad_enabled(grad):
        first = _run(fn, inputs, seed=1234)
        second = _run(fn, inputs, seed=1234)
    assert all(torch.isfinite(t).all() for t in first)
    _bitwise_equal(first, second, f"{op} M={M} grad={grad} dropout={dropout}")
