"""A/B of the GEMM route (LORA_FUSED_BLAS: cuBLASLt with cached plans, or ATen's torch.mm) on the
GPU at hand, routes interleaved in one process: wall time (device-event medians), the host time to
enqueue one call, and the CUDA-graph replay of the same call (the GPU's time with no host in the
way). When host >= graph, the eager call is bound by the host. A development tool.

    python scripts/ab_blas_host.py [--shape 4096:11008] [--M 256,4096] [--rounds 3]
"""

import argparse
import os
import statistics

import torch
from triton.testing import do_bench

import lora_fused
from blas_host_overhead import host_us  # scripts/ is on the path when run as a script
from lora_fused import nf4


def graph_us(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=25, rep=100, return_mode="median") * 1e3


def _set_route(route):
    if route == "aten":
        os.environ["LORA_FUSED_BLAS"] = "aten"
    else:
        os.environ.pop("LORA_FUSED_BLAS", None)


def cases(k, d, M, r=16, s=2.0):
    w = torch.randn(d, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
    packed, state = nf4.quantize(w)
    w_nf4 = nf4.dequantize(packed, state, torch.bfloat16)
    A = (torch.randn(r, k, device="cuda", dtype=torch.bfloat16) * k**-0.5).requires_grad_()
    B = (torch.randn(d, r, device="cuda", dtype=torch.bfloat16) * 0.1).requires_grad_()
    x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, d, device="cuda", dtype=torch.bfloat16)
    xd = x.detach()
    wt = w_nf4.detach().requires_grad_(False)
    return {
        "cuBLAS x@W^T fwd+bwd (bf16 base)": lambda: (torch.mm(xd, wt.t()), torch.mm(dy, wt)),
        "nf4_linear fwd": lambda: lora_fused.nf4_linear(xd, packed, state),
        "nf4_linear fwd+bwd": lambda: torch.autograd.grad(lora_fused.nf4_linear(x, packed, state), (x,), dy),
        "qlora fwd+bwd": lambda: torch.autograd.grad(lora_fused.qlora_linear(x, packed, state, A, B, s), (x, A, B), dy),
        "lora_linear fwd+bwd": lambda: torch.autograd.grad(lora_fused.lora_linear(x, wt, A, B, s), (x, A, B), dy),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4096:11008")
    ap.add_argument("--M", default="256,4096")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    k, d = (int(v) for v in args.shape.split(":"))
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {k}->{d}, r=16, {args.rounds} rounds interleaved")
    for M in (int(m) for m in args.M.split(",")):
        fns = cases(k, d, M)
        res = {}
        for _ in range(args.rounds):
            for route in ("lt", "aten"):
                _set_route(route)
                for name, fn in fns.items():
                    if name.startswith("cuBLAS") and route == "aten":
                        continue
                    wall = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
                    res.setdefault((name, route), []).append((wall, host_us(fn)))
        graphs = {}
        for route in ("lt", "aten"):  # graph replays: the GPU's time with no host in the way
            _set_route(route)
            for name, fn in fns.items():
                try:
                    graphs[(name, route)] = f"{graph_us(fn):8.1f}"
                except Exception as e:  # noqa: BLE001
                    graphs[(name, route)] = f"(no graph: {type(e).__name__})"
        _set_route("lt")
        for name in fns:
            for route in ("lt", "aten"):
                if (name, route) not in res:
                    continue
                walls, hosts = zip(*res[(name, route)])
                print(f"  M={M:5d} {name:34s} {route:4s} wall {statistics.median(walls):8.1f} us"
                      f"  host {statistics.median(hosts):8.1f} us  graph {graphs[(name, route)]} us", flush=True)

if __name__ == "__main__":
    main()
