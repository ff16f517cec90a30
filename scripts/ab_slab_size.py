"""What smaller slabs cost: qlora_linear and nf4_linear forward+backward at 4096 -> 11008, M = 4096, r = 16,
with the default slab (a quarter of the weight) against LORA_FUSED_NF4_SLAB_ELEMS budgets down to 10% of
it (issue 5's peak-memory goal) and no slab at all (LORA_FUSED_NF4_GEMM=ss), interleaved in one
process; time and the peak memory above what the inputs, the output and the gradients take. A development tool.

    python scripts/ab_slab_size.py [--rounds 3] [--M 4096,1024,256]

"default" is what runs unset: from 17 to 1024 tokens (Hopper) the forward runs the CUTLASS RS GEMM and the
input gradient the SS GEMM, with no slab; "slab path" forces the slabs there (LORA_FUSED_NF4_GEMM=slab).
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
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--M", default="4096", help="token counts, comma-separated")
    args = ap.parse_args()
    for m in (int(v) for v in args.M.split(",")):
        run(m, args.rounds)


def run(m, rounds):
    torch.manual_seed(0)
    dt, dev, s = torch.bfloat16, "cuda", 2.0
    k, n, r = 4096, 11008, 16
    w = torch.randn(n, k, device=dev, dtype=dt) * k**-0.5
    packed, state = nf4.quantize(w)
    weight_bytes = w.numel() * w.element_size()
    A = (torch.randn(r, k, device=dev, dtype=dt) * k**-0.5).requires_grad_()
    B = (torch.randn(n, r, device=dev, dtype=dt) * 0.1).requires_grad_()
    x = torch.randn(m, k, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(m, n, device=dev, dtype=dt)
    del w
    cases = {
        "qlora_linear": lambda: torch.autograd.grad(lora_fused.qlora_linear(x, packed, state, A, B, s), (x, A, B), dy),
        "nf4_linear": lambda: torch.autograd.grad(lora_fused.nf4_linear(x, packed, state), (x,), dy),
    }
    # name -> (LORA_FUSED_NF4_SLAB_ELEMS, LORA_FUSED_NF4_GEMM): the slab sizes, and the NF4 GEMM with a
    # decoding warpgroup, which needs no slab (where the build and GPU have it).
    budgets = {"default (1/4)": (None, None), "1/6": (n * k // 6, None), "1/8": (n * k // 8, None),
               "10%": (n * k // 10, None), "slab path": (None, "slab"), "none (ss GEMM)": (None, "ss")}
    times = {(c, b): [] for c in cases for b in budgets}
    peak = {}
    for rnd in range(rounds):
        for c, fn in cases.items():
            for b, (elems, gemm) in budgets.items():
                for var, value in (("LORA_FUSED_NF4_SLAB_ELEMS", elems), ("LORA_FUSED_NF4_GEMM", gemm)):
                    if value is None:
                        os.environ.pop(var, None)
                    else:
                        os.environ[var] = str(value)
                if rnd == min(1, rounds - 1):  # warm (cuBLAS workspaces, plans): the peak of one call
                    # above what is held before it and returned by it
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    grads = fn()
                    torch.cuda.synchronize()
                    held = sum(g.numel() * g.element_size() for g in grads) + m * n * 2  # + the output y
                    peak[(c, b)] = torch.cuda.max_memory_allocated() - base - held
                    del grads
                times[(c, b)].append(do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3)
    os.environ.pop("LORA_FUSED_NF4_SLAB_ELEMS", None)
    os.environ.pop("LORA_FUSED_NF4_GEMM", None)
    print(f"{torch.cuda.get_device_name()}, M={m} {k}->{n} r={r}, fwd+bwd, {rounds} rounds interleaved")
    print("  (extra memory: peak of one call above its inputs, output and returned gradients, % of the bf16 weight)")
    for c in cases:
        for b in budgets:
            t = statistics.median(times[(c, b)])
            print(f"  {c:13s} slab {b:14s} {t:8.1f} us   extra memory {peak[(c, b)] / 2**20:7.1f} MiB "
                  f"({100 * peak[(c, b)] / weight_bytes:5.1f}%)")


if __name__ == "__main__":
    main()
