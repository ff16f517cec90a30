"""Times the NF4 GEMM with a decoding warpgroup (nf4_ss_gemm.cu) beside lora_fused's CUTLASS NF4 GEMM
(register-converting, torch.ops.lora_fused.nf4_gemm_sm90) and cuBLAS on the dequantized bf16 weight,
each result checked against float64 first (NaN-poisoned output; ragged M and N included). Mode 1
(no decode: the A tiles hold stale data) times the MMA pipeline alone. Run by run_probe.sh:

    python probe.py /tmp/nf4_ss_gemm.so [--M 256,1024,4096] [--shapes 4096:11008,...]
"""
import argparse
import ctypes
import os
import sys

import torch
import triton.testing as tt

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from probe_nf4_gemm_sm90 import LEVELS, block_scales, codes  # noqa: E402

from lora_fused import nf4  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("lib")
ap.add_argument("--M", default="1,1000,256,1024,4096")
ap.add_argument("--shapes", default="4096:4000,4096:11008,11008:4096,4096:4096,8192:28672")
args = ap.parse_args()
lib = ctypes.CDLL(args.lib)
lib.nf4_ss_gemm.argtypes = [ctypes.c_int] * 4 + [ctypes.c_void_p] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
ptr = lambda t: ctypes.c_void_p(t.data_ptr() if t is not None else 0)  # noqa: E731
print(torch.cuda.get_device_name(), "torch", torch.__version__)
rs = getattr(torch.ops.lora_fused, "nf4_gemm_sm90", None)

for shape in args.shapes.split(","):
    k, n = (int(v) for v in shape.split(":"))
    w = torch.randn(n, k, device="cuda") * k**-0.5
    packed, state = nf4.quantize(w, blocksize=64)  # double-quantized, as QLoRA stores it
    s2 = state.state2
    scales = block_scales(state).to(torch.bfloat16)  # what both Hopper kernels multiply by
    lv = torch.tensor(LEVELS, device="cuda").to(torch.bfloat16)
    w_used = (lv[codes(packed, n, k)] * scales.view(n, k // 64).repeat_interleave(64, dim=1)).double()  # bf16 product
    w16 = nf4.dequantize(packed, state, torch.bfloat16)
    scales_t = scales.view(n, k // 64).t().contiguous()  # [K / 64, N] for nf4_gemm_sm90
    for m in (int(v) for v in args.M.split(",")):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

        def ours(mode, y):
            rc = lib.nf4_ss_gemm(mode, m, n, k, ptr(x), ptr(packed), None, ptr(state.absmax), ptr(s2.absmax),
                                 ptr(s2.code), float(state.offset), ptr(y), stream)
            assert rc == 0, f"nf4_ss_gemm returned {rc}"

        y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        ours(0, y)
        torch.cuda.synchronize()
        ref = x.double() @ w_used.t()
        err = ((y.double() - ref).norm() / ref.norm()).item()
        err_cublas = (((x @ w16.t()).double() - x.double() @ w16.double().t()).norm() / ref.norm()).item()
        ok = bool(torch.isfinite(y).all()) and err < 4 * err_cublas + 1e-6
        line = f"{k}->{n} M={m}: err {err:.2e} (cuBLAS bf16 {err_cublas:.2e}) {'ok' if ok else 'WRONG'}"
        if not ok:
            bad = (~torch.isfinite(y)).sum().item()
            print(line, f"non-finite {bad}; max abs diff {(y.double() - ref).abs().nan_to_num(1e30).max().item():.3g}", flush=True)
            continue
        t_ours = tt.do_bench(lambda: ours(0, y), return_mode="median") * 1e3
        t_nodecode = tt.do_bench(lambda: ours(1, y), return_mode="median") * 1e3
        t_cublas = tt.do_bench(lambda: x @ w16.t(), return_mode="median") * 1e3
        t_rs = tt.do_bench(lambda: rs(x, packed, scales_t, n, 256 if m > 128 else 128), return_mode="median") * 1e3 if rs else float("nan")
        tf = 2 * m * n * k / t_ours / 1e6
        print(f"{line}; us: ours {t_ours:.1f} ({tf:.0f} TF/s, {t_ours / t_cublas:.3f}x cuBLAS), no decode {t_nodecode:.1f}, "
              f"CUTLASS RS {t_rs:.1f} ({t_rs / t_cublas:.3f}x), cuBLAS bf16 {t_cublas:.1f}", flush=True)
    del w, w16, w_used, packed
