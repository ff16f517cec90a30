"""Where lora_linear's time goes on the GPU: gemm_concat_k (the Hopper GEMM over [K | r]) beside
cuBLAS's x @ W^T of the same shape, the LoRA shrink x @ A^T, and the whole layer's forward and
forward + backward, on random bf16 data (device-event medians, triton.testing.do_bench): with the
Hopper GEMM (LORA_FUSED_GEMM_CONCAT_K=auto), with the cuBLAS path (the default), and the same
GEMMs as plain aten ops under torch's C++ autograd (`aten_layer`: no Python autograd node, one
[M, k] add more in backward), to see what the Python node costs on the host at hand.

    python scripts/bench_gemm_concat_k.py [--r 16] [--M 512,4096]
"""

import argparse
import os

import torch
import triton.testing as tt

import lora_fused
from lora_fused import _ops

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]


def bench(fn):
    return tt.do_bench(fn, warmup=25, rep=100)


def aten_layer(x, w, a, b, s):
    """x W^T + (s x A^T) B^T with the LoRA term as addmm's accumulator, differentiated by torch."""
    u = torch.mm(x, a.t()).mul_(s)  # mm's backward keeps its inputs, not its output: in place is safe
    return torch.addmm(torch.mm(u, b.t()), x, w.t())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--M", default="512,4096,16384")  # above 16 rows: gemm_concat_k's range
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, lora_fused.build_info())
    dt, r = torch.bfloat16, args.r
    for k, d in SHAPES:
        for M in map(int, args.M.split(",")):
            x = torch.randn(M, k, device="cuda", dtype=dt)
            w = torch.randn(d, k, device="cuda", dtype=dt) * k**-0.5
            a = torch.randn(r, k, device="cuda", dtype=dt) * k**-0.5
            b = torch.randn(d, r, device="cuda", dtype=dt) * 0.1
            u = torch.randn(M, r, device="cuda", dtype=dt)
            dy = torch.randn(M, d, device="cuda", dtype=dt)
            ref = (x.float() @ w.float().t() + u.float() @ b.float().t())
            got = _ops.gemm_concat_k(x, w, u, b)
            err = ((got.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, f"gemm_concat_k wrong: {err}"
            flop = 2 * M * d * k
            t_base = bench(lambda: torch.mm(x, w.t()))
            t_cat = bench(lambda: _ops.gemm_concat_k(x, w, u, b))
            t_base_dx = bench(lambda: torch.mm(dy, w))
            t_cat_dx = bench(lambda: _ops.gemm_concat_k(dy, w.t(), u, a.t()))
            t_shrink = bench(lambda: torch.mm(x, a.t()).mul_(2.0))
            xg = x.clone().requires_grad_()
            ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
            t_base_fb = bench(lambda: (torch.mm(x, w.t()), torch.mm(dy, w)))
            os.environ["LORA_FUSED_GEMM_CONCAT_K"] = "auto"  # the Hopper GEMM where its tiles fill the GPU
            t_fwd = bench(lambda: lora_fused.lora_linear(x, w, a, b, 2.0))
            t_fb = bench(lambda: lora_fused.lora_linear(xg, w, ag, bg, 2.0).backward(dy))
            del os.environ["LORA_FUSED_GEMM_CONCAT_K"]  # the default: cuBLAS, same process
            t_fwd_v1 = bench(lambda: lora_fused.lora_linear(x, w, a, b, 2.0))
            t_fb_v1 = bench(lambda: lora_fused.lora_linear(xg, w, ag, bg, 2.0).backward(dy))
            y_aten = aten_layer(xg, w, ag, bg, 2.0)
            y_ours = lora_fused.lora_linear(xg, w, ag, bg, 2.0)
            assert ((y_aten.float() - y_ours.float()).norm() / y_ours.float().norm()).item() < 1e-2, "aten_layer wrong"
            t_fwd_aten = bench(lambda: aten_layer(x, w, a, b, 2.0))
            t_fb_aten = bench(lambda: aten_layer(xg, w, ag, bg, 2.0).backward(dy))
            print(
                f"{k:>5}->{d:<5} M={M:<5} base {t_base*1e3:7.1f}us ({flop/t_base/1e9:4.0f} TF/s)  concat_k {t_cat*1e3:7.1f}us "
                f"({t_cat/t_base:.3f}x)  | dX base {t_base_dx*1e3:7.1f} concat_k {t_cat_dx*1e3:7.1f} ({t_cat_dx/t_base_dx:.3f}x)  "
                f"| shrink {t_shrink*1e3:6.1f}  layer fwd {t_fwd*1e3:7.1f} ({t_fwd/t_base:.3f}x)  fwd+bwd {t_fb*1e3:7.1f} "
                f"({t_fb/t_base_fb:.3f}x of base fwd+dX)  | cuBLAS path: fwd {t_fwd_v1/t_base:.3f}x fwd+bwd {t_fb_v1/t_base_fb:.3f}x"
                f"  | aten_layer: fwd {t_fwd_aten/t_base:.3f}x fwd+bwd {t_fb_aten/t_base_fb:.3f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
