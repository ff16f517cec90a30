"""The build: what was compiled, and that every op is registered with both backends."""

import os

import pytest
import torch

import lora_fused

OPS = ["lora_shrink", "lora_expand", "lora_decode", "nf4_quantize", "nf4_dequantize", "blockwise_quantize"]


def test_build_info_fields():
    info = lora_fused.build_info()
    for key in ("version", "cuda", "cuda_arch_list", "cuda_version", "built_with_torch", "torch"):
        assert key in info
    assert info["version"] == lora_fused.__version__
    if info["cuda"]:
        assert info["cuda_arch_list"], "a CUDA build must say which GPUs it targets"
        assert info["cuda_version"].count(".") == 1
    assert lora_fused.cuda_available() == (info["cuda"] and torch.cuda.is_available())


@pytest.mark.skipif(os.environ.get("LORA_FUSED_EXPECT_CUDA") != "1", reason="set LORA_FUSED_EXPECT_CUDA=1 to require a CUDA build")
def test_cuda_build_expected():
    # CI sets this: the extension must have been built WITH its CUDA sources.
    assert lora_fused.build_info()["cuda"], "expected a CUDA build of lora_fused, got a CPU-only one"


@pytest.mark.parametrize("op", OPS)
def test_op_registered_for_cpu_and_cuda(op):
    handle = getattr(torch.ops.lora_fused, op).default
    assert torch._C._dispatch_has_kernel_for_dispatch_key(handle.name(), "CPU")
    if lora_fused.build_info()["cuda"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(handle.name(), "CUDA")
