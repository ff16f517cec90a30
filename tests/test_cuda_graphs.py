"""CUDA graph capture and replay of every layer: forward + backward (training) in one graph and
inference in another, replayed on fresh inputs and compared with eager calls. M = 1 and 16 take the
decode kernels (inference), 300 the GEMM / slab path."""

import pytest
import torch

import lora_fused
from conftest import randn, requires_cuda

K, N = 256, 136


def _layer(kind):
    if kind == "LoraLinear":
        layer = lora_fused.LoraLinear(K, N, r=8, lora_alpha=16, dtype=torch.bfloat16, device="cuda")
    elif kind == "NF4Linear":
        return lora_fused.NF4Linear(K, N, device="cuda")
    else:
        layer = lora_fused.QLoraLinear(K, N, r=8, lora_alpha=16, device="cuda")
    torch.nn.init.normal_(layer.lora_B, std=0.1)  # a trained adapter: the LoRA branch must count
    return layer


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["LoraLinear", "NF4Linear", "QLoraLinear"])
@pytest.mark.parametrize("M", [1, 16, 300])
def test_capture_and_replay_forward_backward_and_inference(kind, M):
    layer = _layer(kind)
    x = randn(M, K, dtype=torch.bfloat16, device="cuda").requires_grad_()
    g = randn(M, N, dtype=torch.bfloat16, device="cuda")
    params = [x, layer.bias] + ([layer.lora_A, layer.lora_B] if kind != "NF4Linear" else [])

    def step():
        y = layer(x)
        return (y,) + torch.autograd.grad(y, params, g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
        for _ in range(2):
            step()
            with torch.no_grad():
                layer(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    infer_graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(infer_graph):
        y_infer = layer(x)
    for _ in range(2):  # fresh inputs each replay
        with torch.no_grad():
            x.copy_(randn(M, K, dtype=torch.bfloat16, device="cuda"))
            g.copy_(randn(M, N, dtype=torch.bfloat16, device="cuda"))
        graph.replay()
        infer_graph.replay()
        expected = step()
        for got, want in zip(outs, expected):
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(y_infer, expected[0], rtol=2e-2, atol=2e-2)
