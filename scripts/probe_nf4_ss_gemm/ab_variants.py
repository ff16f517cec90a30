"""Builds of the NF4 GEMM with a decoding warpgroup against each other and cuBLAS bf16, interleaved in one
process: a GPU's clock drifts over a run by as much as the builds differ (session 21: cuBLAS itself 9% apart
between two rows of one probe run), so each round times every build and cuBLAS back to back, and the ratio
is taken within the round. Each build is checked against float64 first; a wrong one is reported, not timed.
Needs no lora_fused build (the probe's C entry, as quick_check.py).

    python scripts/probe_nf4_ss_gemm/ab_variants.py c2=/tmp/ss_c2.so c4=/tmp/ss_c4.so --M 4096 --rounds 3
"""
import argparse
import ctypes
import statistics

import torch
from triton.testing import do_bench

from ss_entry import load_entry, ptr, random_weight

ap = argparse.ArgumentParser()
ap.add_argument("builds", nargs="+", help="label=path of a .so with the probe's entry")
ap.add_argument("--M", default="4096")
ap.add_argument("--shapes", default="4096:11008,11008:4096,4096:4096")
ap.add_argument("--rounds", type=int, default=3)
args = ap.parse_args()

entries = {}
for spec in args.builds:
    label, path = spec.split("=", 1)
    entries[label] = load_entry(path)
bench = lambda f: do_bench(f, warmup=25, rep=100, return_mode="median") * 1e3  # noqa: E731  us
torch.manual_seed(0)
print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
for shape in args.shapes.split(","):
    k, n = (int(v) for v in shape.split(":"))
    packed, scales, ld, w16 = random_weight(n, k)
    for trans in (0, 1):
        for m in (int(v) for v in args.M.split(",")):
            act = torch.randn(m, n if trans else k, device="cuda", dtype=torch.bfloat16)
            w_op = w16 if trans else w16.t()
            ref = act.double() @ w_op.double()
            err_cublas = (((act @ w_op).double() - ref).norm() / ref.norm()).item()
            stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
            y = torch.empty(m, k if trans else n, device="cuda", dtype=torch.bfloat16)
            runs = {}
            what = f"{'dX = dY W' if trans else 'y = x W^T'} {k}->{n} M={m}"
            for label, entry in entries.items():
                def run(entry=entry):
                    rc = entry(0, trans, m, n, k, ptr(act), ptr(packed), ptr(scales), ld, None, 0, None, ptr(y), stream)
                    assert rc == 0, f"nf4_ss_gemm returned {rc}"
                y.fill_(float("nan"))
                run()
                torch.cuda.synchronize()
                err = ((y.double() - ref).norm() / ref.norm()).item()
                if torch.isfinite(y).all() and err < 4 * err_cublas + 1e-6:
                    runs[label] = run
                else:
                    print(f"{what} {label}: WRONG (err {err:.2e}, cuBLAS {err_cublas:.2e}, "
                          f"non-finite {(~torch.isfinite(y)).sum().item()})", flush=True)
            del ref
            times = {label: [] for label in runs}
            ratios = {label: [] for label in runs}
            t_cublas = []
            for _ in range(args.rounds):
                tc = bench(lambda: act @ w_op)
                t_cublas.append(tc)
                for label, run in runs.items():
                    t = bench(run)
                    times[label].append(t)
                    ratios[label].append(t / tc)
            cols = ", ".join(f"{label} {statistics.median(times[label]):.1f} ({statistics.median(ratios[label]):.3f}x)"
                             for label in runs)
            print(f"{what}: us (median of {args.rounds} rounds; x cuBLAS within a round): {cols}, "
                  f"cuBLAS bf16 {statistics.median(t_cublas):.1f}", flush=True)
