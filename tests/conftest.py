"""Shared test helpers: devices, seeds, the per-dtype error rule, output poisoning."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

import lora_fused

HAS_CUDA = lora_fused.cuda_available()
CUDA_SKIP_REASON = (
    "no CUDA device" if lora_fused.build_info()["cuda"] else "lora_fused was built CPU-only (no nvcc at build time)"
)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)])]
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]

# Relative error allowed on top of "at most 2x PyTorch's own error in the same dtype", for cases where
# PyTorch happens to be (nearly) exact. fp32: two BLAS orderings of a tiny (rank-1, M = 1) gradient
# differed by 6e-6 against 1.8e-6 on the GPU machine's CPU, noise that says nothing about a kernel.
ERROR_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def pytest_configure(config):
    # Registered here as well as in pyproject.toml, so a copy of tests/ run elsewhere knows them.
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and the CUDA build (skipped otherwise, with the reason)")
    config.addinivalue_line("markers", "slow: long randomized runs (scripts/gpu_check.sh --full)")


def pytest_collection_modifyitems(config, items):
    # LORA_FUSED_CUDA_CASES_ONLY=1 (scripts/gpu_check.sh --cuda-cases): leave out the cases
    # parametrized with device "cpu", which CI runs anyway, so a GPU call spends its time on CUDA.
    if os.environ.get("LORA_FUSED_CUDA_CASES_ONLY") != "1":
        return
    def on_cpu(it):
        return getattr(it, "callspec", None) is not None and it.callspec.params.get("device") == "cpu"

    cpu = [it for it in items if on_cpu(it)]
    if cpu:
        config.hook.pytest_deselected(items=cpu)
        items[:] = [it for it in items if not on_cpu(it)]


@pytest.fixture(autouse=True)
def _seed(request):
    # A fresh, reproducible stream per test, derived from its id (LORA_FUSED_TEST_SEED shifts all).
    seed = int(os.environ.get("LORA_FUSED_TEST_SEED", "0")) + zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield


@pytest.fixture(params=["default", "sm90"])
def gemm_path(request, monkeypatch):
    """Which way CUDA's gemm_concat_k goes: "default" (cuBLAS for now) or "sm90" (the Hopper kernel
    wherever it can run, small test shapes included). Other GPUs and CPU run the ATen GEMMs either way."""
    if request.param == "sm90":
        monkeypatch.setenv("LORA_FUSED_GEMM_CONCAT_K", "sm90")
    else:
        monkeypatch.delenv("LORA_FUSED_GEMM_CONCAT_K", raising=False)
    return request.param


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a64, r64 = a.detach().double().cpu(), ref.detach().double().cpu()
    denom = r64.norm().item()
    return (a64 - r64).norm().item() / (denom if denom > 0 else 1.0)


def assert_error_rule(ours: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: torch.Tensor, what: str = ""):
    """ours must be finite where the reference is, and its error against the float64 reference at
    most 2x that of PyTorch computing the same thing in the same dtype (plus a small floor)."""
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(ours).any(), f"{what}: NaN in the output (unwritten or poisoned elements?)"
    e_ours, e_torch = rel_err(ours, ref64), rel_err(torch_same_dtype, ref64)
    bound = 2.0 * e_torch + ERROR_FLOOR[ours.dtype]
    assert e_ours <= bound, f"{what}: relative error {e_ours:.3e} > bound {bound:.3e} (PyTorch {e_torch:.3e})"


def poison_allocator(device: str, nbytes: int = 64 << 20):
    """Fill memory the caching allocator will hand out next with NaN, so elements an op forgets
    to write show up as NaN."""
    if device == "cuda":
        t = torch.full((nbytes // 4,), float("nan"), device=device)
        del t


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(device=device, dtype=dtype)
