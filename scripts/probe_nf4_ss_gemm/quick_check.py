"""A quick GPU check of the NF4 GEMM with a decoding warpgroup through the probe's entry (no lora_fused build
needed): random NF4 codes and bf16 scales, forward and backward, with and without the LoRA columns, ragged sizes,
against float64 on the same bf16 level x scale products; NaN-poisoned outputs.

    nvcc ... csrc/cuda/sm90/nf4_ss_gemm.cu scripts/probe_nf4_ss_gemm/entry.cu -o /tmp/nf4_ss_gemm.so   (as run_probe.sh)
    python scripts/probe_nf4_ss_gemm/quick_check.py /tmp/nf4_ss_gemm.so
"""
import ctypes
import sys

import torch

from ss_entry import load_entry, ptr, random_weight

nf4_ss_gemm = load_entry(sys.argv[1])
torch.manual_seed(0)
bad = 0
for (m, n, k) in ((300, 136, 320), (1000, 1008, 2048), (37, 96, 64), (1500, 264, 1024)):
    packed, scales, ld, w = random_weight(n, k)
    w = w.double()
    for trans in (0, 1):
        for r in (0, 16):
            act = torch.randn(m, n if trans else k, device="cuda", dtype=torch.bfloat16)
            feats = k if trans else n
            lw = (torch.randn(r, k, device="cuda", dtype=torch.bfloat16) if trans else
                  torch.randn(n, r, device="cuda", dtype=torch.bfloat16)) if r else None
            la = torch.randn(m, r, device="cuda", dtype=torch.bfloat16) if r else None
            ref = act.double() @ (w if trans else w.t())
            if r:
                ref += la.double() @ (lw.double() if trans else lw.double().t())
            w16 = w.to(torch.bfloat16)
            # cuBLAS doing the same sum in bf16 (with LoRA: one addmm), against the same reference
            base16 = act @ (w16 if trans else w16.t())
            full16 = torch.addmm(base16, la, lw if trans else lw.t()) if r else base16
            err_cublas = ((full16.double() - ref).norm() / ref.norm()).item()
            y = torch.full((m, feats), float("nan"), device="cuda", dtype=torch.bfloat16)
            rc = nf4_ss_gemm(0, trans, m, n, k, ptr(act), ptr(packed), ptr(scales), ld, ptr(lw), r, ptr(la), ptr(y),
                                 ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
            torch.cuda.synchronize()
            err = ((y.double() - ref).norm() / ref.norm()).item() if rc == 0 else float("nan")
            ok = rc == 0 and bool(torch.isfinite(y).all()) and err < 4 * err_cublas + 1e-6
            bad += not ok
            print(f"{'bwd' if trans else 'fwd'} m={m} n={n} k={k} r={r}: rc {rc} err {err:.2e} (cuBLAS {err_cublas:.2e})"
                  f"{'' if ok else ' WRONG'}", flush=True)
print("quick check:", "all correct" if bad == 0 else f"{bad} WRONG")
sys.exit(1 if bad else 0)
