"""A/B of lora_adapter_grads' two CUDA routes on the GPU at hand, interleaved in one process: du and dB
from one read of grad_out (LORA_FUSED_LORA_GRADS=fused) against two cuBLAS GEMMs (=gemm; read at each
call), alone and inside qlora_linear / lora_linear forward+backward. A development tool.

    python scripts/ab_lora_grads.py [--rounds 3]
"""

import argparse
import os
import statistics

import torch
from triton.testing import do_bench

import lora_fused
from lora_fused import _ops, nf4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    dt, dev, s = torch.bfloat16, "cuda", 2.0
    cases = {}
    for m, k, n, r in ((4096, 4096, 11008, 16), (4096, 4096, 4096, 16), (4096, 4096, 4096, 64), (256, 4096, 11008, 16)):
        dy, x = torch.randn(m, n, device=dev, dtype=dt), torch.randn(m, k, device=dev, dtype=dt)
        a, b = torch.randn(r, k, device=dev, dtype=dt) * k**-0.5, torch.randn(n, r, device=dev, dtype=dt) * 0.1
        cases[f"lora_adapter_grads M={m} {k}->{n} r={r}"] = lambda dy=dy, x=x, a=a, b=b: _ops.lora_adapter_grads(dy, x, a, b, s)
    k, n, m, r = 4096, 11008, 4096, 16
    w = torch.randn(n, k, device=dev, dtype=dt) * k**-0.5
    packed, state = nf4.quantize(w)
    A = (torch.randn(r, k, device=dev, dtype=dt) * k**-0.5).requires_grad_()
    B = (torch.randn(n, r, device=dev, dtype=dt) * 0.1).requires_grad_()
    x = torch.randn(m, k, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(m, n, device=dev, dtype=dt)
    cases[f"qlora fwd+bwd M={m} {k}->{n} r={r}"] = lambda: torch.autograd.grad(
        lora_fused.qlora_linear(x, packed, state, A, B, s), (x, A, B), dy)
    cases[f"lora_linear fwd+bwd M={m} {k}->{n} r={r}"] = lambda: torch.autograd.grad(
        lora_fused.lora_linear(x, w, A, B, s), (x, A, B), dy)
    xd = x.detach()
    cases[f"cuBLAS x @ W^T + dY @ W, M={m} {k}->{n}"] = lambda: (xd @ w.t(), dy @ w)
    times = {(name, mode): [] for name in cases for mode in ("fused", "gemm")}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            for mode in ("fused", "gemm"):
                os.environ["LORA_FUSED_LORA_GRADS"] = mode
                fn()
                times[(name, mode)].append(do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3)
    os.environ.pop("LORA_FUSED_LORA_GRADS", None)
    print(f"{torch.cuda.get_device_name()}, {args.rounds} rounds interleaved, medians of device-event medians (us):")
    for name in cases:
        f, g = statistics.median(times[(name, "fused")]), statistics.median(times[(name, "gemm")])
        print(f"  {name:48s} one read {f:8.1f}   two GEMMs {g:8.1f}   ratio {g / f:5.3f}")


if __name__ == "__main__":
    main()
