"""Runs the NF4 GEMM with a decoding warpgroup (nf4_ss_gemm.cu, via probe entry.cu) on random NF4 codes and bf16
scales, for Nsight Compute to sample where its warps stall (ncu_stalls.sh). Needs torch only.

    python ncu_stalls.py /tmp/nf4_ss_gemm.so M K N MODE [TRANS]
"""
import ctypes
import sys

import torch

lib = ctypes.CDLL(sys.argv[1])
m, k, n, mode = (int(v) for v in sys.argv[2:6])
trans = int(sys.argv[6]) if len(sys.argv) > 6 else 0
lib.nf4_ss_gemm.argtypes = ([ctypes.c_int] * 5 + [ctypes.c_void_p] * 3 + [ctypes.c_longlong, ctypes.c_void_p, ctypes.c_int]
                            + [ctypes.c_void_p] * 3)
act = torch.randn(m, n if trans else k, device="cuda", dtype=torch.bfloat16)
packed = torch.randint(0, 256, (n * k // 2,), device="cuda", dtype=torch.uint8)
ld = (n + 7) // 8 * 8
scales = (torch.rand(k // 64, ld, device="cuda") + 0.5).to(torch.bfloat16)
y = torch.empty(m, k if trans else n, device="cuda", dtype=torch.bfloat16)
stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
for _ in range(3):
    rc = lib.nf4_ss_gemm(mode, trans, m, n, k, ctypes.c_void_p(act.data_ptr()), ctypes.c_void_p(packed.data_ptr()),
                         ctypes.c_void_p(scales.data_ptr()), ld, None, 0, None,
                         ctypes.c_void_p(y.data_ptr()), stream)
    assert rc == 0, rc
torch.cuda.synchronize()
print("ran", m, k, n, mode, trans, "finite:", bool(torch.isfinite(y).all()))
if len(sys.argv) > 7:  # timing too: median us of each mode listed in argv[7] ("4,5")
    import triton.testing as tt

    for md in (int(v) for v in sys.argv[7].split(",")):
        f = lambda: lib.nf4_ss_gemm(md, trans, m, n, k, ctypes.c_void_p(act.data_ptr()), ctypes.c_void_p(packed.data_ptr()),  # noqa: E731
                                    ctypes.c_void_p(scales.data_ptr()), ld, None, 0, None,
                                    ctypes.c_void_p(y.data_ptr()), stream)
        w = torch.randn(k if trans else n, n if trans else k, device="cuda", dtype=torch.bfloat16)
        print(f"mode {md}: {tt.do_bench(f, return_mode='median') * 1e3:.1f} us; cuBLAS "
              f"{tt.do_bench(lambda: act @ (w if trans else w.t()), return_mode='median') * 1e3:.1f} us", flush=True)
