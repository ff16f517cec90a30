"""A/B of qlora_linear's LoRA merge on the GPU at hand, modes interleaved in one process.

    python scripts/ab_nf4_merge.py [--shape 4096:11008] [--M 4096] [--rounds 7]
    python scripts/ab_nf4_merge.py --var LORA_FUSED_NF4_MERGE_AHEAD --values 1,2,1p   (another switch)

Times qlora_linear forward+backward (r=16, device-event medians per round) under each
LORA_FUSED_NF4_MERGE value (read at each call, so one process serves all), round-robin so clock and
thermal drift fall on every mode alike, and the cuBLAS GEMM x @ W^T on the NF4-dequantized weight
beside the same GEMM on the original random bf16 weight and on the dequantized weight plus a LoRA
term (W + s B A): tensor-core GEMMs draw more power, so run slower, on high-entropy operands, which
decides whether merging s B A into the slabs can pay. A development tool.
"""

import argparse
import os
import statistics

import torch
from triton.testing import do_bench

import lora_fused
from lora_fused import nf4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4096:11008")
    ap.add_argument("--M", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--var", default="LORA_FUSED_NF4_MERGE", help="the environment variable to A/B")
    ap.add_argument("--values", default="0,1,gemm", help="its values, comma-separated")
    args = ap.parse_args()
    k, d = (int(v) for v in args.shape.split(":"))
    r, s = 16, 2.0
    torch.manual_seed(0)
    w = torch.randn(d, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
    packed, state = nf4.quantize(w)
    w_nf4 = nf4.dequantize(packed, state, torch.bfloat16)
    A = (torch.randn(r, k, device="cuda", dtype=torch.bfloat16) * k**-0.5).requires_grad_()
    B = (torch.randn(d, r, device="cuda", dtype=torch.bfloat16) * 0.1).requires_grad_()
    w_merged = (w_nf4.float() + s * B.detach().float() @ A.detach().float()).to(torch.bfloat16)
    x = torch.randn(args.M, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(args.M, d, device="cuda", dtype=torch.bfloat16)
    xd = x.detach()
    cases = {f"qlora fwd+bwd {args.var}={m}": (m, lambda: torch.autograd.grad(
        lora_fused.qlora_linear(x, packed, state, A, B, s), (x, A, B), dy)) for m in args.values.split(",")}

    @torch.no_grad()
    def forward():
        return lora_fused.qlora_linear(xd, packed, state, A, B, s)

    cases.update({f"qlora fwd (no grad) {args.var}={m}": (m, forward) for m in args.values.split(",")})
    for name, wt in (("nf4-valued W", w_nf4), ("random bf16 W", w), ("nf4 W + s B A", w_merged)):
        cases[f"cuBLAS x @ W^T, {name}"] = (None, lambda wt=wt: xd @ wt.t())
    times = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (mode, fn) in cases.items():
            if mode is not None:
                os.environ[args.var] = mode
            fn()
            times[name].append(do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3)
    os.environ.pop(args.var, None)
    print(f"{torch.cuda.get_device_name()}, {k}->{d}, M={args.M}, r={r}, {args.rounds} rounds interleaved (us):")
    for name, ts in times.items():
        print(f"  {name:56s} median {statistics.median(ts):8.1f}  min {min(ts):8.1f}  max {max(ts):8.1f}")


if __name__ == "__main__":
    main()
