"""Host time of each piece of an NF4 / QLoRA training step at one shape (development tool): the
autograd engine's own cost (a trivial op's backward), each lora_fused op called directly, and the
whole fwd+bwd, beside the CUDA-graph replay of the step (the GPU's time). Host time = seconds to
enqueue N calls (the GPU queue never fills at these sizes) / N.

    python scripts/host_breakdown.py [--shape 4096:11008] [--M 256] [--profile]
"""

import argparse

import torch

import lora_fused
from blas_host_overhead import host_us  # scripts/ is on the path when run as a script
from lora_fused import _ops, nf4


class _Twice(torch.autograd.Function):
    """A trivial Python autograd node: what the node itself costs the host on CUDA."""

    @staticmethod
    def forward(ctx, t):
        return t * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4096:11008")
    ap.add_argument("--M", type=int, default=256)
    ap.add_argument("--profile", action="store_true", help="also a CPU-side profile of 10 qlora fwd+bwd steps")
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
        "Python autograd.Function t*2 fwd+bwd": lambda: torch.autograd.grad(_Twice.apply(small), (small,), torch.ones_like(small)),
        "qlora_linear fwd only (autograd node made)": lambda: lora_fused.qlora_linear(x, packed, state, A, B, s),
    }
    y = lora_fused.qlora_linear(x, packed, state, A, B, s)
    rows["qlora_linear bwd only (retain_graph)"] = lambda: torch.autograd.grad(y, (x, A, B), dy, retain_graph=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {k}->{d}, M={M}, r={r}: host us per call")
    for name, fn in rows.items():
        print(f"  {name:45s} {host_us(fn):8.1f}", flush=True)
    # CUDA backward runs on the engine's device thread; on the calling thread instead, the handoffs go.
    with torch.autograd.set_multithreading_enabled(False):
        for name in ("autograd.grad of small*2 (engine alone)", "Python autograd.Function t*2 fwd+bwd",
                     "qlora_linear fwd+bwd (autograd)", "nf4_linear fwd+bwd (autograd)", "qlora_linear bwd only (retain_graph)"):
            print(f"  {name + ', one thread':45s} {host_us(rows[name]):8.1f}", flush=True)
    if args.profile:  # where the host time of qlora fwd+bwd goes, op by op (CPU side)
        step = rows["qlora_linear fwd+bwd (autograd)"]
        step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=70))


if __name__ == "__main__":
    main()
