"""Does compute-sanitizer's initcheck see what cuBLAS writes? (development tool)

    compute-sanitizer --tool initcheck --print-limit 2 python scripts/initcheck_probe.py

scripts/sanitize_slice.py's lora_decode case M = 7, K = 264, r = 16 (K % 32 != 0: u = x @ A^T by
cuBLAS, at::mm) draws initcheck reports of lora_decode's reads of u. Here torch's own copy kernel
reads such a u first (step A), then lora_decode runs (B), then torch reads a new cuBLAS u (C) and
lora_expand reads it (D). On the H100 (CUDA 13.0, torch 2.11, session 24) initcheck reported reads
in all four steps (672 errors; run as these steps without the error prints): it does not see the
writes of the cuBLAS kernel picked there, so the reports are not about memory nobody wrote. (A
version without lora_fused imported drew no report for the same mm: the kernel cuBLAS picks may
differ.) scripts/sanitize_slice.py leaves that case out of initcheck's runs (--quick).
"""

import os

import torch

from lora_fused import _ops


def main() -> None:
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to("cuda", torch.bfloat16)  # noqa: E731
    M, k, d, r = 7, 264, 33, 16
    x, w, a = rnd(M, k), rnd(d, k, sc=k**-0.5), rnd(r, k, sc=k**-0.5)
    b, bias = rnd(d, r, sc=0.3), rnd(d)
    want_u = x.double() @ a.double().t()
    os.environ["LORA_FUSED_DECODE_KERNEL"] = "mma"
    u = torch.mm(x, a.t())
    torch.cuda.synchronize()
    print("A: torch reads cuBLAS's u", flush=True)
    err = ((u.float().double() - want_u).abs().max() / want_u.abs().max()).item()
    print(f"   relative error {err:.1e}", flush=True)
    print("B: lora_decode (its own cuBLAS u)", flush=True)
    y = _ops.lora_decode(x, w, a, b, 2.0, bias)
    want = x.double() @ w.double().t() + 2.0 * want_u @ b.double().t() + bias.double()
    print(f"   relative error {((y.double() - want).abs().max() / want.abs().max()).item():.1e}", flush=True)
    u = torch.mm(x, a.t())
    torch.cuda.synchronize()
    print("C: torch reads a new cuBLAS u", flush=True)
    u.float()
    torch.cuda.synchronize()
    print("D: lora_expand reads it", flush=True)
    y0 = rnd(M, d)
    got = _ops.lora_expand(y0, u, b, 2.0)
    want = y0.double() + 2.0 * u.double() @ b.double().t()
    print(f"   relative error {((got.double() - want).abs().max() / want.abs().max()).item():.1e}", flush=True)


if __name__ == "__main__":
    main()
