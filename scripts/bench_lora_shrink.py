"""lora_shrink's tensor-core kernel beside cuBLAS for the LoRA layer's two skinny products, in one
process on random bf16 data (device-event medians, triton.testing.do_bench):

  u  = s x A^T  [M, k] x [r, k]^T  (forward)    ours: lora_shrink(x, A, s)     cuBLAS: mm(x, A^T).mul_(s)
  dU = s dY B   [M, d] x [d, r]    (backward)   ours: lora_shrink(dY, B^T, s)  cuBLAS: mm(dY, B).mul_(s)

HBM figures count the bytes of x (or dY) read once, against the copy bandwidth measured here.

    python scripts/bench_lora_shrink.py [--M 1,16,512,4096,16384] [--r 8,16,64]
"""

import argparse

import torch
import triton.testing as tt

from lora_fused import _ops, functional

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]


def bench(fn):
    return tt.do_bench(fn, warmup=25, rep=100) * 1e3  # us


def copy_bandwidth():
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / (bench(lambda: b.copy_(a)) * 1e-6)


def cublas_shrink(x, a, s):
    return functional._scaled_mm(x, a.t(), s)


def check(ours, x, a, s, what):
    ref = (x.double() @ a.double().t()) * s
    err = ((ours.double() - ref).norm() / ref.norm()).item()
    err_torch = ((cublas_shrink(x, a, s).double() - ref).norm() / ref.norm()).item()
    assert err <= 2 * err_torch + 1e-3, f"{what}: error {err:.2e} against cuBLAS's {err_torch:.2e}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", default="1,16,512,4096,16384")
    ap.add_argument("--r", default="8,16,64")
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, f"copy {bw / 1e12:.2f} TB/s", flush=True)
    dt, s = torch.bfloat16, 2.0
    for r in map(int, args.r.split(",")):
        for k, d in SHAPES:
            for M in map(int, args.M.split(",")):
                x = torch.randn(M, k, device="cuda", dtype=dt)
                dy = torch.randn(M, d, device="cuda", dtype=dt)
                a = torch.randn(r, k, device="cuda", dtype=dt) * k**-0.5
                b = torch.randn(d, r, device="cuda", dtype=dt) * d**-0.5
                check(_ops.lora_shrink(x, a, s), x, a, s, f"u {M}x{k} r={r}")
                check(_ops.lora_shrink(dy, b.t(), s), dy, b.t(), s, f"dU {M}x{d} r={r}")
                t_u, t_u_blas = bench(lambda: _ops.lora_shrink(x, a, s)), bench(lambda: cublas_shrink(x, a, s))
                t_du, t_du_blas = bench(lambda: _ops.lora_shrink(dy, b.t(), s)), bench(lambda: cublas_shrink(dy, b.t(), s))
                line = (
                    f"r={r:<3} {k:>5}->{d:<5} M={M:<5} u: ours {t_u:7.1f}us ({x.nbytes / t_u / 1e6 / bw * 1e12:4.0%} HBM) "
                    f"cuBLAS {t_u_blas:7.1f}us ({t_u_blas / t_u:.2f}x) | dU: ours {t_du:7.1f}us "
                    f"({dy.nbytes / t_du / 1e6 / bw * 1e12:4.0%}) cuBLAS {t_du_blas:7.1f}us ({t_du_blas / t_du:.2f}x)"
                )
                print(line, flush=True)


if __name__ == "__main__":
    main()
