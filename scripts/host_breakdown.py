"""Host time of each piece of an NF4 / QLoRA training step at one shape (development tool): the
autograd engine's own cost (a trivial op's backward), each lora_fused op called directly, and the
whole fwd+bwd, beside the CUDA-graph replay of the step (the GPU's time). Host time = seconds to
enqueue N calls (the GPU queue never fills at these sizes) / N.

    python scripts/host_breakdown.py [--shape 4096:11008] [--M 256]
"""

import argparse

import torch

import lora_fused
from blas_host_overhead import host_us  # scripts/ is on the path when run as a script
from lora_fused import _ops, nf4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4096:11008")
    ap.add_argument("--M", type=int, default=256)
    args = ap.parse_args()
    k, d = (int(v) for v in args.shape.split(":"))
    M, r, s = args.M, 16, 2.0
    torch.manual_seed(0)
    bf = torch.bfloat16
    packed, state = nf4.quantize(torch.randn(d, k, device="cuda", dtype=bf) * k**-0.5)
    s2 = state.state2
    w = (packed, state.absmax, s2.absmax, s2.code, state.offset, state.blocksize, s2.blocksize)
    A = (torch.randn(r, k, device="cuda", dtype=bf) * k**-0.5).requires_grad_()
    B = (torch.randn(d, r, device="cuda", dtype=bf) * 0.1).requires_grad_()
    x = torch.randn(M, k, device="cuda", dtype=bf, requires_grad=True)
    dy = torch.randn(M, d, device="cuda", dtype=bf)
    xd, Ad, Bd = x.detach(), A.detach(), B.detach()
    u = xd @ Ad.t()
    du = dy @ Bd
    small = torch.randn(M, 8, device="cuda", requires_grad=True)
    rows = {
        "torch.mm x@A^T (one cuBLAS call)": lambda: torch.mm(xd, Ad.t()),
        "autograd.grad of small*2 (engine alone)": lambda: torch.autograd.grad(small * 2, (small,), torch.ones_like(small)),
        "nf4_linear fwd, no LoRA": lambda: _ops.nf4_linear(xd, *w, d),
        "nf4_linear fwd, lora_A (u made inside)": lambda: _ops.nf4_linear(xd, *w, d, None, None, Bd, Ad, s),
        "nf4_linear fwd, lora_u given": lambda: _ops.nf4_linear(xd, *w, d, None, u, Bd),
        "nf4_linear_grad_input, no LoRA": lambda: _ops.nf4_linear_grad_input(dy, *w, k),
        "nf4_linear_grad_input, lora_du + A": lambda: _ops.nf4_linear_grad_input(dy, *w, k, du, Ad, Bd, s),
        "lora_adapter_grads": lambda: _ops.lora_adapter_grads(dy, xd, Ad, Bd, s),
        "qlora_linear fwd (no grad)": lambda: lora_fused.qlora_linear(xd, packed, state, Ad, Bd, s),
        "qlora_linear fwd+bwd (autograd)": lambda: torch.autograd.grad(
            lora_fused.qlora_linear(x, packed, state, A, B, s), (x, A, B), dy),
        "nf4_linear fwd+bwd (autograd)": lambda: torch.autograd.grad(lora_fused.nf4_linear(x, packed, state), (x,), dy),
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {k}->{d}, M={M}, r={r}: host us per call")
    for name, fn in rows.items():
        print(f"  {name:45s} {host_us(fn):8.1f}", flush=True)


if __name__ == "__main__":
    main()
