"""lora_dropout (Philox from a seed, the mask regenerated in backward) and the layers' dropout:
rate and scaling, the same mask for the same seed (CPU and CUDA alike), strides, and no more saved
memory with dropout than without."""

import pytest
import torch

import lora_fused
from conftest import DEVICES, HAS_CUDA, CUDA_SKIP_REASON, randn
from lora_fused import _ops, nf4


def _seed(value, device):
    return torch.tensor([value], dtype=torch.int64, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_rate_and_scaling(device, dtype, p):
    x = (torch.rand(2048, 129) + 0.5).to(device, dtype)
    out = _ops.lora_dropout(x, p, _seed(1234, device))
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    kept = out != 0
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # kept values: x * (1 / (1 - p)) in acc
    expected = (x.to(acc) * torch.tensor(1.0 / (1.0 - p), dtype=acc)).to(dtype)
    torch.testing.assert_close(out[kept], expected[kept], rtol=0, atol=0)
    rate, sigma = (~kept).double().mean().item(), (p * (1 - p) / kept.numel()) ** 0.5
    assert abs(rate - p) < 5 * sigma, f"zero rate {rate:.4f}, expected {p} +- {5 * sigma:.4f}"


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_mask_other_seed_other_mask(device):
    x = randn(300, 64, device=device)
    a = _ops.lora_dropout(x, 0.3, _seed(7, device))
    assert torch.equal(a, _ops.lora_dropout(x, 0.3, _seed(7, device)))
    b = _ops.lora_dropout(x, 0.3, _seed(8, device))
    assert not torch.equal(a != 0, b != 0)
    # Rows of the mask are not copies of each other (the counter runs over all elements).
    assert not torch.equal(a[0] != 0, a[1] != 0)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_follows_logical_index_not_strides(device):
    base = randn(96, 80, device=device)
    view = base.t()[:, 3:67]  # [80, 64], column-major with an offset
    got = _ops.lora_dropout(view, 0.4, _seed(99, device))
    assert torch.equal(got, _ops.lora_dropout(view.contiguous(), 0.4, _seed(99, device)))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_and_cuda_draw_the_same_mask(dtype):
    x = randn(517, 33, dtype=dtype)
    cpu = _ops.lora_dropout(x, 0.25, _seed(2**40 + 5, "cpu"))
    cuda = _ops.lora_dropout(x.cuda(), 0.25, _seed(2**40 + 5, "cuda")).cpu()
    assert torch.equal(cpu != 0, cuda != 0)
    torch.testing.assert_close(cuda, cpu, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = randn(37, 24, device=device)
    torch.library.opcheck(torch.ops.lora_fused.lora_dropout.default, (x, 0.2, _seed(3, device)))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    x = randn(8, 16, device=device)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        _ops.lora_dropout(x, 1.0, _seed(1, device))
    with pytest.raises(TypeError, match="one-element int64"):
        _ops.lora_dropout(x, 0.1, torch.tensor([1.0], device=device))
    with pytest.raises(ValueError, match="2 dimensions"):
        _ops.lora_dropout(x[0], 0.1, _seed(1, device))
    if device == "cuda":
        with pytest.raises(RuntimeError, match="seed must be on x's device"):
            _ops.lora_dropout(x, 0.1, _seed(1, "cpu"))


def _saved_bytes(fn):
    """Bytes of the distinct tensors autograd saves for backward while running fn."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", ["lora_linear", "qlora_linear"])
def test_dropout_saves_no_more_than_no_dropout(device, layer):
    # PEFT's dropout (torch's) keeps the dropped copy of x and a mask: 3 bytes per element of x in
    # bf16. Ours keeps the seed (8 bytes) and regenerates both in backward.
    M, k, d, r = 256, 128, 96, 8
    x = randn(M, k, device=device, dtype=torch.bfloat16).requires_grad_()
    a = randn(r, k, device=device, dtype=torch.bfloat16, scale=0.1).requires_grad_()
    b = randn(d, r, device=device, dtype=torch.bfloat16, scale=0.1).requires_grad_()
    if layer == "lora_linear":
        w = randn(d, k, device=device, dtype=torch.bfloat16)
        run = lambda p: lora_fused.lora_linear(x, w, a, b, 2.0, dropout_p=p)  # noqa: E731
    else:
        packed, state = nf4.quantize(randn(d, k, device=device), 64)
        run = lambda p: lora_fused.qlora_linear(x, packed, state, a, b, 2.0, dropout_p=p)  # noqa: E731
    without, with_dropout = _saved_bytes(lambda: run(0.0)), _saved_bytes(lambda: run(0.1))
    assert with_dropout <= without + 64, f"saved {with_dropout} bytes with dropout, {without} without"
