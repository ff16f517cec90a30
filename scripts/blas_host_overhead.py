"""Host (CPU) time that one cuBLAS call costs through torch, per BLAS backend, at the slab GEMM
shapes of the NF4 path (development tool: the NF4 slab loop issues one GEMM per slab, so this
decides whether it is host-bound). Also a cuBLAS-only program for compute-sanitizer's racecheck.

    python scripts/blas_host_overhead.py            # host us per torch.mm / addmm_ call
    python scripts/blas_host_overhead.py --tiny     # one small bf16 mm (for sanitizer checks)
"""

import sys
import time

import torch


def host_us(fn, n=20):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return us


def main():
    if "--tiny" in sys.argv:
        x = torch.randn(1, 96, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(40, 96, device="cuda", dtype=torch.bfloat16)
        y = torch.mm(x, w.t()) + 1
        torch.cuda.synchronize()
        print("tiny mm ok", float(y.float().abs().sum()) > 0)
        return
    bf = torch.bfloat16
    x = torch.randn(4096, 4096, device="cuda", dtype=bf)
    slab = torch.randn(1024, 4096, device="cuda", dtype=bf)
    out = torch.empty(4096, 4096, device="cuda", dtype=bf)
    dy = torch.randn(4096, 4096, device="cuda", dtype=bf)
    for lib in ("cublas", "cublaslt"):
        try:
            torch.backends.cuda.preferred_blas_library(lib)
        except Exception as e:  # noqa: BLE001
            print(lib, "unavailable:", e)
            continue
        rows = {
            "mm x@slab^T [4096,1024]": lambda: torch.mm(x, slab.t()),
            "addmm_ into out column block": lambda: out[:, :1024].addmm_(x, slab.t()),
            "mm_out dy@slab -> strided": lambda: torch.mm(dy[:, :1024], slab, out=torch.empty(4096, 4096, device="cuda", dtype=bf)),
            "mm 4096^3": lambda: torch.mm(x, dy),
            "mm skinny [4096,16]": lambda: torch.mm(x, slab[:16].t()),
        }
        for name, fn in rows.items():
            print(f"{lib:9s} {name:32s} host {host_us(fn):7.1f} us")


if __name__ == "__main__":
    main()
