"""pytest-benchmark suites for the same cases as `python -m lora_fused.bench`:

    pytest benchmarks --benchmark-only

Not part of the default test run (pyproject's testpaths is tests/). Each timed call synchronizes the
device, so the figures are wall-clock times of finished work; for device-event medians and ratios
against the baselines, use the CLI.
"""

import pytest
import torch

import lora_fused
from lora_fused import bench, nf4

CUDA = lora_fused.cuda_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = [(4096, 4096), (4096, 11008)] if CUDA else [(256, 384)]
MS = [1, 16, 4096] if CUDA else [1, 64]
PROVIDERS = ["lora_fused", "torch", "base_gemm"] + (["peft"] if bench._importable("peft") else [])
BNB = bench._importable("bitsandbytes")
NF4_PROVIDERS = ["lora_fused", "base_gemm"] + (["bitsandbytes"] if BNB else [])
QLORA_PROVIDERS = ["lora_fused", "base_gemm"] + (["bnb+torch"] if BNB else []) + (
    ["peft+bnb"] if BNB and bench._importable("peft") else []
)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _timed(benchmark, fwd, params, g, mode):
    def run():
        y = fwd()
        if mode == "fwdbwd":
            torch.autograd.grad(y, params, g)
        _sync()

    benchmark(run)


def _nf4_case(M, k, d, r=16, dtype=torch.bfloat16):
    x = torch.randn(M, k, device=DEVICE, dtype=dtype)
    packed, state = nf4.quantize(torch.randn(d, k, device=DEVICE, dtype=dtype) * k**-0.5, 64)
    a = torch.randn(r, k, device=DEVICE, dtype=dtype) * k**-0.5
    b = torch.randn(d, r, device=DEVICE, dtype=dtype) * r**-0.5
    g = torch.randn(M, d, device=DEVICE, dtype=dtype)
    return x, packed, state, nf4.dequantize(packed, state, dtype), a, b, g


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("k,d", SHAPES)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_lora_linear(benchmark, provider, M, k, d, mode):
    r, dtype = 16, torch.bfloat16
    x = torch.randn(M, k, device=DEVICE, dtype=dtype)
    w = torch.randn(d, k, device=DEVICE, dtype=dtype) * k**-0.5
    a = torch.randn(r, k, device=DEVICE, dtype=dtype) * k**-0.5
    b = torch.randn(d, r, device=DEVICE, dtype=dtype) * r**-0.5
    g = torch.randn(M, d, device=DEVICE, dtype=dtype)
    fwd, params = bench.lora_linear_providers(x, w, a, b, 2.0, 2 * r, provider == "peft")[provider]
    _timed(benchmark, fwd, params, g, mode)


NF4_CASES = [("nf4_linear", p) for p in NF4_PROVIDERS] + [("qlora_linear", p) for p in QLORA_PROVIDERS]


@pytest.mark.parametrize("op,provider", NF4_CASES)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("k,d", SHAPES)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_nf4_layers(benchmark, op, provider, M, k, d, mode):
    x, packed, state, w16, a, b, g = _nf4_case(M, k, d)
    if op == "nf4_linear":
        providers = bench.nf4_linear_providers(x, packed, state, w16, provider == "bitsandbytes")
    else:
        providers = bench.qlora_linear_providers(
            x, packed, state, w16, a, b, 2.0, 32, with_peft=provider == "peft+bnb",
            with_bnb=provider in ("bnb+torch", "peft+bnb"),
        )
    fwd, params = providers[provider]
    _timed(benchmark, fwd, params, g, mode)


@pytest.mark.parametrize("k,d", SHAPES)
def test_nf4_dequantize(benchmark, k, d):
    packed, state = nf4.quantize(torch.randn(d, k, device=DEVICE, dtype=torch.bfloat16), 64)

    def run():
        nf4.dequantize(packed, state)
        _sync()

    benchmark(run)
