"""Kernels for Nsight Compute: each target runs once between cudaProfilerStart/Stop, after one
unprofiled call, so `ncu --profile-from-start off` sees exactly the kernels of the targets named.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight ... \
        python scripts/ncu_targets.py nf4_gemm_128x256 cublas lora_decode_m1 ...

Targets (4096->11008 unless named; bf16): nf4_gemm_128x256 / nf4_gemm_128x128 (the NF4 Hopper GEMM,
M=4096 or --M), cublas (x @ W^T, the same M), slab (nf4_linear's slab path, same M), slab_merged
(qlora_linear forward on the slab path, s B A merged into each decoded slab),
lora_decode_m1 / lora_decode_m16 and cublas_m1 / cublas_m16 (decode), nf4_decode_m1 / nf4_decode_m16
(nf4_linear at 1 and 16 tokens), qlora_decode_m16 (qlora_linear's inference path at 16 tokens, r = 16).
"""

import argparse
import os

import torch

import lora_fused
from lora_fused import _ops, nf4
from probe_nf4_gemm_sm90 import block_scales  # same folder: the GEMM's bf16 group scales


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("targets", nargs="+")
    ap.add_argument("--M", type=int, default=4096)
    ap.add_argument("--shape", default="4096:11008")
    args = ap.parse_args()
    k, n = (int(v) for v in args.shape.split(":"))
    dt = torch.bfloat16
    w = torch.randn(n, k, device="cuda") * k**-0.5
    w16 = w.to(dt)
    packed, state = nf4.quantize(w, blocksize=64)
    scales = block_scales(state).to(dt).view(n, k // 64).t().contiguous()  # [K / 64, N]
    a = (torch.randn(16, k, device="cuda") * k**-0.5).to(dt)
    b = (torch.randn(n, 16, device="cuda") * 0.1).to(dt)
    xs = {m: torch.randn(m, k, device="cuda", dtype=dt) for m in (1, 16, args.M)}
    x = xs[args.M]

    def slab():
        os.environ["LORA_FUSED_NF4_GEMM"] = "slab"
        try:
            return lora_fused.nf4_linear(x, packed, state)
        finally:
            del os.environ["LORA_FUSED_NF4_GEMM"]

    fns = {
        "nf4_gemm_128x256": lambda: torch.ops.lora_fused.nf4_gemm_sm90(x, packed, scales, n, 256),
        "nf4_gemm_128x128": lambda: torch.ops.lora_fused.nf4_gemm_sm90(x, packed, scales, n, 128),
        "cublas": lambda: x @ w16.t(),
        "slab": slab,
        # qlora_linear's forward at M >= 2048: the slabs decoded with s B A merged in (no grad: no backward)
        "slab_merged": lambda: lora_fused.qlora_linear(x, packed, state, a, b, 2.0),
        "lora_decode_m1": lambda: _ops.lora_decode(xs[1], w16, a, b, 2.0),
        "lora_decode_m16": lambda: _ops.lora_decode(xs[16], w16, a, b, 2.0),
        "cublas_m1": lambda: xs[1] @ w16.t(),
        "cublas_m16": lambda: xs[16] @ w16.t(),
        "nf4_decode_m1": lambda: lora_fused.nf4_linear(xs[1], packed, state),
        "nf4_decode_m16": lambda: lora_fused.nf4_linear(xs[16], packed, state),
        # qlora_linear's inference path at 16 tokens: the shrink kernel, then the decode kernel with
        # the LoRA term staged in shared memory (r = 16)
        "qlora_decode_m16": lambda: lora_fused.qlora_linear(xs[16], packed, state, a, b, 2.0, training=False),
    }
    unknown = [t for t in args.targets if t not in fns]
    if unknown:
        raise SystemExit(f"unknown targets {unknown}; known: {sorted(fns)}")
    for t in args.targets:
        fns[t]()  # unprofiled: CUTLASS initialisation, cuBLAS handles, allocator
    torch.cuda.synchronize()
    for t in args.targets:
        print("target", t, flush=True)
        torch.cuda.profiler.start()
        fns[t]()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
