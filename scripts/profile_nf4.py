"""Where the time of the NF4 layer goes, kernel by kernel (torch.profiler), on the GPU at hand.

    python scripts/profile_nf4.py [--shapes 4096:4096,8192:28672] [--M 1,16,4096] [--qlora]

For each shape and M: nf4_linear forward, nf4_linear_grad_input (backward dX), and the cuBLAS bf16
GEMMs they stand beside, each run a few times under the profiler; prints the summed CUDA time per
kernel name. A development tool: the benchmark CLI (python -m lora_fused.bench) is what users run.
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

import lora_fused
from lora_fused import _ops, nf4


def show(title, fn, reps=5):
    fn()
    torch.cuda.synchronize()
    # Wall time (device events, median) and host time to enqueue one call: when the host time
    # exceeds the kernels' sum, the GPU idles between kernels and the wall time shows it.
    wall_us = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    host_us = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    print(f"== {title} (per call): wall {wall_us:.1f} us, host enqueue {host_us:.1f} us")
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.count >= reps:
            rows.append((t / reps, e.count // reps, e.key))
    print(f"  {sum(us for us, _, _ in rows):9.1f} us  kernels in all")
    for us, n, key in sorted(rows, reverse=True)[:12]:
        print(f"  {us:9.1f} us  x{n:<3d} {key[:110]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096:4096,8192:28672")
    ap.add_argument("--M", default="1,16,4096")
    ap.add_argument("--qlora", action="store_true", help="profile qlora_linear forward+backward (r=16) instead")
    ap.add_argument("--host", action="store_true", help="with --qlora: where the host (CPU) time goes, per op")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --qlora: repeat the cases in turn (clock drift then falls on each alike), and add "
                         "qlora_linear with lora_B = 0 (its merged slabs hold the NF4 values exactly)")
    args = ap.parse_args()
    if args.qlora:
        return profile_qlora(args)
    for spec in args.shapes.split(","):
        k, d = (int(v) for v in spec.split(":"))
        w = torch.randn(d, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        packed, state = nf4.quantize(w)
        w16 = nf4.dequantize(packed, state, torch.bfloat16)
        s2 = state.state2
        nf4_args = (packed, state.absmax, s2.absmax, s2.code, state.offset, state.blocksize, s2.blocksize)
        for m in (int(v) for v in args.M.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            dy = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
            show(f"{k}->{d} M={m} nf4_linear", lambda: lora_fused.nf4_linear(x, packed, state))
            show(f"{k}->{d} M={m} cuBLAS x @ W^T", lambda: x @ w16.t())
            show(f"{k}->{d} M={m} nf4_linear_grad_input", lambda: _ops.nf4_linear_grad_input(dy, *nf4_args, k))
            show(f"{k}->{d} M={m} cuBLAS dy @ W", lambda: dy @ w16)
        show(f"{k}->{d} nf4_dequantize (whole weight)", lambda: nf4.dequantize(packed, state, torch.bfloat16))


def profile_qlora(args, r=16):
    """qlora_linear forward+backward beside nf4_linear forward+backward, same x, W and dY."""
    for spec in args.shapes.split(","):
        k, d = (int(v) for v in spec.split(":"))
        w = torch.randn(d, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        packed, state = nf4.quantize(w)
        A = (torch.randn(r, k, device="cuda", dtype=torch.bfloat16) * k**-0.5).requires_grad_()
        B = (torch.randn(d, r, device="cuda", dtype=torch.bfloat16) * 0.1).requires_grad_()
        for m in (int(v) for v in args.M.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            dy = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
            # autograd.grad, not backward(): no .grad accumulation kernels in the figures.
            qlora = lambda: torch.autograd.grad(lora_fused.qlora_linear(x, packed, state, A, B, 2.0), (x, A, B), dy)  # noqa: E731
            B0 = torch.zeros_like(B, requires_grad=True)
            for rnd in range(args.rounds):
                tag = f" (round {rnd + 1})" if args.rounds > 1 else ""
                show(f"{k}->{d} M={m} nf4_linear fwd+bwd{tag}",
                     lambda: torch.autograd.grad(lora_fused.nf4_linear(x, packed, state), x, dy))
                show(f"{k}->{d} M={m} qlora_linear fwd+bwd{tag}", qlora, reps=5)
                if args.rounds > 1:
                    show(f"{k}->{d} M={m} qlora_linear fwd+bwd, lora_B = 0{tag}",
                         lambda: torch.autograd.grad(lora_fused.qlora_linear(x, packed, state, A, B0, 2.0), (x, A, B0), dy))
            if args.host:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(5):
                        qlora()
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
