"""The LoRA layer's backward GEMMs one by one, on the GPU, in plain torch (no lora_fused build needed):
which of them makes forward + backward at 4096->4096, M = 4096 cost ~1.8-2.5x the base (against
~1.2x at the other shapes), and whether another way of writing the same product avoids it.

    python scripts/profile_lora_backward.py
"""

import torch
import triton.testing as tt


def t(fn):
    return tt.do_bench(fn, warmup=25, rep=100) * 1e3  # us


def main():
    dt, r = torch.bfloat16, 16
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for k, d in [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (4096, 14336)]:
        for M in (2048, 4096, 8192):
            x = torch.randn(M, k, device="cuda", dtype=dt)
            w = torch.randn(d, k, device="cuda", dtype=dt)
            a = torch.randn(r, k, device="cuda", dtype=dt)
            b = torch.randn(d, r, device="cuda", dtype=dt)
            u = torch.randn(M, r, device="cuda", dtype=dt)
            dy = torch.randn(M, d, device="cuda", dtype=dt)
            du = torch.randn(M, r, device="cuda", dtype=dt)
            row = {
                "base x@W^T": t(lambda: torch.mm(x, w.t())),
                "base dY@W": t(lambda: torch.mm(dy, w)),
                "u=x@A^T": t(lambda: torch.mm(x, a.t())),
                "dU=dY@B": t(lambda: torch.mm(dy, b)),
                "dB=dY^T@u": t(lambda: torch.mm(dy.t(), u)),
                "dB=(u^T@dY)^T": t(lambda: torch.mm(u.t(), dy).t()),
                "dA=dU^T@x": t(lambda: torch.mm(du.t(), x)),
                "dA=(x^T@dU)^T": t(lambda: torch.mm(x.t(), du).t()),
                "dX=addmm(dU@A,dY,W)": t(lambda: torch.addmm(torch.mm(du, a), dy, w)),
                "dbias=dY.sum(0)": t(lambda: dy.sum(0)),
            }
            print(f"{k:>5}->{d:<5} M={M:<5} " + "  ".join(f"{n} {v:7.1f}" for n, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
