"""Where should nf4_linear take the NF4 GEMM with a decoding warpgroup (LORA_FUSED_NF4_GEMM=ss)? A/B
of the modes on the GPU at hand, interleaved in one process (the variable is read at each call).

    python scripts/ab_nf4_gemm_mode.py [--shapes 4096:11008,11008:4096,4096:4096] [--M 64,...,4096]
                                       [--modes auto,ss] [--rounds 3] [--cases fwd,dX,fwd+LoRA,dX+LoRA]

Per shape and M: nf4_linear forward, nf4_linear_grad_input (dX = dY W) and both with the LoRA pair
(r = 16; the ops qlora_linear calls), under each mode, beside cuBLAS on the dequantized bf16 weight
(x W^T, dY W) in the same rounds. Each mode's result is checked against float64 first (bound: 2x
cuBLAS's own error on the same bf16 weight, plus 1e-2 of the output's scale). Device-event medians
per round (do_bench), then the median over rounds; ratios within a round. A development tool.
"""

import argparse
import os
import statistics

import torch
from triton.testing import do_bench

from lora_fused import _ops, nf4


def args_of(packed, state):
    s2 = state.state2
    return (packed, state.absmax, s2.absmax, s2.code, float(state.offset), state.blocksize, s2.blocksize)


def check(name, got, ref64, cublas):
    err = (got.double() - ref64).abs().max().item()
    base = (cublas.double() - ref64).abs().max().item()
    bound = 2 * base + 1e-2 * ref64.abs().max().item()
    if not (err <= bound):  # NaN fails too
        raise SystemExit(f"WRONG {name}: max error {err:.3e} > bound {bound:.3e} (cuBLAS {base:.3e})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096:11008,11008:4096,4096:4096")
    ap.add_argument("--M", default="64,256,512,1024,2048,4096")
    ap.add_argument("--modes", default="auto,ss")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default="fwd,dX,fwd+LoRA,dX+LoRA")
    args = ap.parse_args()
    modes = args.modes.split(",")
    r, s = 16, 0.5
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    torch.manual_seed(0)
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split(":"))
        w = torch.randn(n, k, device="cuda") * k**-0.5
        packed, state = nf4.quantize(w)
        w16 = nf4.dequantize(packed, state, torch.bfloat16)
        w64 = w16.double()
        lf = args_of(packed, state)
        A = torch.randn(r, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        B = torch.randn(n, r, device="cuda", dtype=torch.bfloat16) * r**-0.5
        for m in (int(v) for v in args.M.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            u64 = s * x.double() @ A.double().t()
            du64 = s * dy.double() @ B.double()
            cases = {  # name: (ours, cuBLAS on the bf16 weight, float64 reference)
                "fwd": (lambda: _ops.nf4_linear(x, *lf, n), lambda: x @ w16.t(), x.double() @ w64.t()),
                "dX": (lambda: _ops.nf4_linear_grad_input(dy, *lf, k), lambda: dy @ w16, dy.double() @ w64),
                "fwd+LoRA": (lambda: _ops.nf4_linear(x, *lf, n, None, None, B, A, s),
                             lambda: torch.addmm(x @ w16.t(), (s * x @ A.t()), B.t()),
                             x.double() @ w64.t() + u64 @ B.double().t()),
                "dX+LoRA": (lambda: _ops.nf4_linear_grad_input(dy, *lf, k, None, A, B, s),
                            lambda: torch.addmm(dy @ w16, (s * dy @ B), A),
                            dy.double() @ w64 + du64 @ A.double()),
            }
            for name, (ours, cublas, ref) in ((c, cases[c]) for c in args.cases.split(",")):
                want = cublas()
                for mode in modes:
                    os.environ["LORA_FUSED_NF4_GEMM"] = mode
                    check(f"{shape} M={m} {name} {mode}", ours(), ref, want)
                times = {mode: [] for mode in modes + ["cuBLAS"]}
                for _ in range(args.rounds):
                    times["cuBLAS"].append(do_bench(cublas, return_mode="median") * 1e3)
                    for mode in modes:
                        os.environ["LORA_FUSED_NF4_GEMM"] = mode
                        times[mode].append(do_bench(ours, return_mode="median") * 1e3)
                ratio = {mode: statistics.median(t / c for t, c in zip(times[mode], times["cuBLAS"])) for mode in modes}
                med = {key: statistics.median(v) for key, v in times.items()}
                cols = ", ".join(f"{mode} {med[mode]:.1f} ({ratio[mode]:.3f}x)" for mode in modes)
                print(f"{shape} M={m} {name}: us (x cuBLAS within a round): {cols}, cuBLAS {med['cuBLAS']:.1f}; "
                      f"{modes[-1]}/{modes[0]} {med[modes[-1]] / med[modes[0]]:.3f}", flush=True)
            os.environ.pop("LORA_FUSED_NF4_GEMM", None)
            del x, dy


if __name__ == "__main__":
    main()
