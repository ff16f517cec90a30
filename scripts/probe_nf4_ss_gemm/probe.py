"""Times the NF4 GEMM with a decoding warpgroup (csrc/cuda/sm90/nf4_ss_gemm.cu), forward y = x W^T and backward
dX = dY W, beside cuBLAS on the dequantized bf16 weight and what lora_fused runs today: the CUTLASS
NF4 GEMM that converts in the MMA warps' registers (torch.ops.lora_fused.nf4_gemm_sm90, forward
only) and nf4_linear / nf4_linear_grad_input (the slab path from 2048 tokens). Every result is
checked against float64 first (NaN-poisoned output; ragged M, N and K included). Mode 1 (no
decode: the A tiles hold stale data) times the MMA pipeline alone, mode 2 all but the output stores;
"as the op (ss)" is nf4_linear / nf4_linear_grad_input with LORA_FUSED_NF4_GEMM=ss (with the bf16
group scales it makes at each call). With --lora R (default 16; 0:
none), each case runs again with the LoRA term as R more reduction columns ([x | u] [W | B]^T,
[dY | du] [W ; A]; u = s x A^T and du = s dY B made by cuBLAS and timed with it) beside lora_fused's
qlora forward / input gradient today (nf4_linear / nf4_linear_grad_input given the LoRA pair).
Run by run_probe.sh:

    python probe.py /tmp/nf4_ss_gemm.so [--M 1,1000,256,1024,4096] [--shapes 4096:11008,...]
"""
import argparse
import ctypes
import os
import sys

import torch
import triton.testing as tt

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from probe_nf4_gemm_sm90 import LEVELS, block_scales, codes  # noqa: E402

from lora_fused import _ops, nf4  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("lib")
ap.add_argument("--M", default="1,1000,256,1024,4096")
ap.add_argument("--shapes", default="4032:4000,4096:11008,11008:4096,4096:4096")  # 8192:28672: slow float64 references
ap.add_argument("--lora", type=int, default=16)
args = ap.parse_args()
lib = ctypes.CDLL(args.lib)
lib.nf4_ss_gemm.argtypes = ([ctypes.c_int] * 5 + [ctypes.c_void_p] * 3 + [ctypes.c_longlong, ctypes.c_void_p, ctypes.c_int]
                            + [ctypes.c_void_p] * 3)
ptr = lambda t: ctypes.c_void_p(t.data_ptr() if t is not None else 0)  # noqa: E731
bench = lambda f: tt.do_bench(f, return_mode="median") * 1e3  # noqa: E731
print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
rs = getattr(torch.ops.lora_fused, "nf4_gemm_sm90", None)

for shape in args.shapes.split(","):
    k, n = (int(v) for v in shape.split(":"))
    w = torch.randn(n, k, device="cuda") * k**-0.5
    packed, state = nf4.quantize(w, blocksize=64)  # double-quantized, as QLoRA stores it
    s2 = state.state2
    scales = block_scales(state).to(torch.bfloat16)  # what the Hopper kernels multiply by
    lv = torch.tensor(LEVELS, device="cuda").to(torch.bfloat16)
    w_used = (lv[codes(packed, n, k)] * scales.view(n, k // 64).repeat_interleave(64, dim=1)).double()  # bf16 products
    w16 = nf4.dequantize(packed, state, torch.bfloat16)
    scales_t = scales.view(n, k // 64).t().contiguous()  # [K / 64, N] for nf4_gemm_sm90
    ld = (n + 7) // 8 * 8  # the SS GEMM's: [K / 64, ld], as nf4_group_scales makes them
    scales_ss = torch.zeros(k // 64, ld, device="cuda", dtype=torch.bfloat16)
    scales_ss[:, :n] = scales_t
    lf_args = (packed, state.absmax, s2.absmax, s2.code, float(state.offset), 64, s2.blocksize)
    rank, sc = args.lora, 0.5
    lora_A = torch.randn(rank, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
    lora_B = torch.randn(n, rank, device="cuda", dtype=torch.bfloat16) * rank**-0.5
    for trans in (0, 1):
        for m in (int(v) for v in args.M.split(",")):
            act = torch.randn(m, n if trans else k, device="cuda", dtype=torch.bfloat16)
            feats = k if trans else n
            stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
            w16_op = w16 if trans else w16.t()
            ref_base = act.double() @ (w_used if trans else w_used.t())
            err_cublas = (((act @ w16_op).double() - act.double() @ w16_op.double()).norm() / ref_base.norm()).item()
            for r in ((0, rank) if rank else (0,)):
                # u = s x A^T (forward) or du = s dY B (backward), as the layer makes them.
                lw, la = ((lora_A, None) if trans else (lora_B, None)) if r else (None, None)
                make_u = (lambda: torch.mm(act, lora_B).mul_(sc)) if trans else (lambda: torch.mm(act, lora_A.t()).mul_(sc))
                if r:
                    la = make_u()

                def ours(mode, y, lora_act=None):
                    rc = lib.nf4_ss_gemm(mode, trans, m, n, k, ptr(act), ptr(packed), ptr(scales_ss), ld, ptr(lw), r,
                                         ptr(lora_act if lora_act is not None else la), ptr(y), stream)
                    assert rc == 0, f"nf4_ss_gemm returned {rc}"

                ref = ref_base + (la.double() @ (lora_A.double() if trans else lora_B.double().t()) if r else 0)
                what = f"{'dX = dY W ' if trans else 'y = x W^T '}{k}->{n} M={m}{f' LoRA r={r}' if r else ''}"
                line, wrong = what + ":", False
                y = torch.full((m, feats), float("nan"), device="cuda", dtype=torch.bfloat16)
                ours(0, y)
                torch.cuda.synchronize()
                err = ((y.double() - ref).norm() / ref.norm()).item()
                ok = bool(torch.isfinite(y).all()) and err < 4 * err_cublas + 1e-6
                line += f" err {err:.2e}{'' if ok else ' WRONG'}"
                if not ok:
                    diff = (y.double() - ref).abs().nan_to_num(1e30)
                    line += (f" (non-finite {(~torch.isfinite(y)).sum().item()}, max abs diff {diff.max().item():.3g} "
                             f"at {divmod(diff.argmax().item(), feats)})")
                    wrong = True
                line += f" (cuBLAS bf16 {err_cublas:.2e})"
                if wrong:
                    print(line, flush=True)
                    continue
                t_cublas = bench(lambda: act @ w16_op)
                if r:  # ours with its u / du GEMM, against lora_fused's LoRA-merged slab path today
                    t_ours = bench(lambda: ours(0, y, make_u()))
                    t_kernel = bench(lambda: ours(0, y))  # u / du made once before: the kernel alone
                    t_u = bench(make_u)
                    if trans:
                        t_lf = bench(lambda: _ops.nf4_linear_grad_input(act, *lf_args, k, None, lora_A, lora_B, sc))
                    else:
                        t_lf = bench(lambda: _ops.nf4_linear(act, *lf_args, n, None, None, lora_B, lora_A, sc))
                    print(f"{line}; us: ours + u GEMM {t_ours:.1f} ({t_ours / t_cublas:.3f}x cuBLAS base; the kernel alone {t_kernel:.1f}, the u GEMM alone {t_u:.1f}), "
                          f"lora_fused today {t_lf:.1f} ({t_lf / t_cublas:.3f}x), cuBLAS bf16 base {t_cublas:.1f}", flush=True)
                    continue
                t_ours = bench(lambda: ours(0, y))
                t_nodecode = bench(lambda: ours(1, y))
                t_nostores = bench(lambda: ours(2, y))
                if trans:
                    op = lambda: _ops.nf4_linear_grad_input(act, *lf_args, k)  # noqa: E731
                    t_rs = float("nan")
                else:
                    op = lambda: _ops.nf4_linear(act, *lf_args, n)  # noqa: E731
                    t_rs = bench(lambda: rs(act, packed, scales_t, n, 256 if m > 128 else 128)) if rs else float("nan")
                t_lf = bench(op)
                os.environ["LORA_FUSED_NF4_GEMM"] = "ss"  # the op through this kernel: + nf4_group_scales
                t_op = bench(op)
                del os.environ["LORA_FUSED_NF4_GEMM"]
                tf = 2 * m * n * k / t_ours / 1e6
                print(f"{line}; us: ours {t_ours:.1f} ({tf:.0f} TF/s, {t_ours / t_cublas:.3f}x cuBLAS), as the op (ss) {t_op:.1f} ({t_op / t_cublas:.3f}x), "
                      f"no decode {t_nodecode:.1f}, no stores {t_nostores:.1f}, "
                      f"CUTLASS RS {t_rs:.1f} ({t_rs / t_cublas:.3f}x), lora_fused today {t_lf:.1f} ({t_lf / t_cublas:.3f}x), "
                      f"cuBLAS bf16 {t_cublas:.1f}", flush=True)
    del w, w16, w_used, packed
