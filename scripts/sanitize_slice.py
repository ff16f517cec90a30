"""Every CUDA kernel of lora_fused once or twice, at small odd sizes, for compute-sanitizer
(scripts/gpu_check.sh --sanitize runs it under memcheck, racecheck, initcheck and synccheck,
checking only lora_fused's own kernels). Each call's result is checked against float64 too, so a
run that computes garbage fails here even where no tool reports. lora_linear's training path is
not here: it is cuBLAS GEMMs only (no lora_fused kernel), and racecheck (CUDA 13.0) fails with an
internal "failed to handle a hardware exception" on those cuBLAS calls (scripts/racecheck_probe.py).

    compute-sanitizer --tool memcheck --kernel-name kns=lora_fused python3 scripts/sanitize_slice.py
    options: --quick (one case per kernel family), --no-cublas (no cuBLAS call: for racecheck),
             --decode-only (lora_decode's kernels only)
"""

import os
import sys

import torch

import lora_fused
from lora_fused import _ops, nf4, reference
from lora_fused.functional import _nf4_args


def close(got, ref, what, tol):
    err = (got.double().cpu() - ref.double().cpu()).norm() / max(ref.double().norm().item(), 1e-30)
    assert err < tol, f"{what}: relative error {err:.2e}"
    print(f"ok {what} ({err:.1e})", flush=True)


def main():
    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s, dt=bf, sc=1.0: (torch.randn(*s, generator=g) * sc).to(dev, dt)  # noqa: E731
    quick = "--quick" in sys.argv  # initcheck is slow: one case per kernel family
    # racecheck (CUDA 13.0) fails with an internal "failed to handle a hardware exception" in runs with
    # cuBLAS GEMMs (uninstrumented, yet they take the process down: lora_linear's training path, qlora's
    # u = x A^T and its backward). --no-cublas keeps to calls without them: qlora's decode kernel fed
    # by lora_shrink, no slab path (whose decode kernel is the only one left unchecked), no backward.
    no_cublas = "--no-cublas" in sys.argv
    # lora_decode's kernels, each forced (CUDA-core; tensor-core; bulk copies on sm_90), u from the shrink kernel's partial
    # sums under programmatic dependent launch (k % 32 == 0) or from cuBLAS; odd d, strided lora_B.
    # initcheck (the --quick runs) does not see the writes of the cuBLAS kernel that makes u where k %
    # 32 != 0, so it reports every read of that u, torch's own included (scripts/initcheck_probe.py).
    for M, k, d, r in ((1, 96, 40, 8), (7, 264, 33, 16), (16, 1056, 72, 24), (9, 2080, 17, 8)):
        if (no_cublas or quick) and k % 32:
            continue
        x, w, a = rnd(M, k), rnd(d, k, sc=k**-0.5), rnd(r, k, sc=k**-0.5)
        b = rnd(r, d, sc=0.3).t() if M == 9 else rnd(d, r, sc=0.3)
        bias = rnd(d)
        kernels = ("simt", "mma", "simt+LORA_FUSED_DECODE_STREAM_HINTS=1", "mma+LORA_FUSED_DECODE_STREAM_HINTS=1")
        for kern in kernels + (("bulk",) if torch.cuda.get_device_capability() == (9, 0) else ()):
            name, *extra = kern.split("+")
            env = {"LORA_FUSED_DECODE_KERNEL": name, **dict(e.split("=") for e in extra)}
            os.environ.update(env)
            close(_ops.lora_decode(x, w, a, b, 2.0, bias), reference.lora_linear(x, w, a, b, 2.0, bias),
                  f"lora_decode {kern} M={M} {k}->{d} r={r}", 2e-2)
            for key in env:
                del os.environ[key]
    if "--decode-only" in sys.argv:
        print("sanitize slice: all kernels ran and matched float64 (--decode-only)", flush=True)
        return
    # gemm_concat_k's Hopper kernel (CUTLASS), asked for explicitly since it is not the default path.
    if torch.cuda.get_device_capability() == (9, 0) and lora_fused.build_info()["sm90_gemm"]:
        os.environ["LORA_FUSED_GEMM_CONCAT_K"] = "sm90"
        for M, N, K1, K2, nn in ((37, 264, 136, 16, False), (130, 72, 200, 8, True))[: 1 if quick else 2]:
            a1, a2 = rnd(M, K1), rnd(M, K2)
            b1 = rnd(K1, N, sc=K1**-0.5).t() if nn else rnd(N, K1, sc=K1**-0.5)
            b2 = rnd(K2, N, sc=0.3).t() if nn else rnd(N, K2, sc=0.3)
            bias = rnd(N)
            ref = a1.double() @ b1.double().t() + a2.double() @ b2.double().t() + bias.double()
            close(_ops.gemm_concat_k(a1, b1, a2, b2, bias), ref, f"gemm_concat_k sm90 M={M} {'nn' if nn else 'nt'}", 2e-2)
        del os.environ["LORA_FUSED_GEMM_CONCAT_K"]
        # The NF4 GEMM with a decoding warpgroup (LORA_FUSED_NF4_GEMM=ss): forward with bias and the
        # LoRA pair in the kernel (u given: no cuBLAS), input gradient with du given; ragged M, N, K (tiles of 256 tokens, 128 features, 64 columns).
        os.environ["LORA_FUSED_NF4_GEMM"] = "ss"
        M, N, K, r = 37, 136, 192, 16
        packed, state = nf4.quantize(rnd(N, K, dt=torch.float32, sc=K**-0.5))
        x, bias, A, B, gy = rnd(M, K), rnd(N), rnd(r, K, sc=K**-0.5), rnd(N, r, sc=0.3), rnd(M, N)
        u, du = _ops.lora_shrink(x, A, 2.0), _ops.lora_shrink(gy, B.t().contiguous(), 2.0)
        fwd_args = _nf4_args("nf4_linear", x, packed, state)
        bwd_args = fwd_args[:-1] + (K,)
        w64 = reference.nf4_dequantize(packed, state).to(dev)
        y = _ops.nf4_linear(x, *fwd_args, bias, u, B)
        close(y, x.double() @ w64.t() + u.double() @ B.double().t() + bias.double(), f"nf4 SS GEMM fwd M={M}", 2e-2)
        dx = _ops.nf4_linear_grad_input(gy, *bwd_args, du, A)
        close(dx, gy.double() @ w64 + du.double() @ A.double(), f"nf4 SS GEMM dX M={M}", 2e-2)
        del os.environ["LORA_FUSED_NF4_GEMM"]
    for M, k, d, r in ((1, 96, 40, 8), (7, 129, 33, 5), (37, 256, 72, 16))[: 1 if quick else 3]:
        x, w, a, b = rnd(M, k), rnd(d, k, sc=k**-0.5), rnd(r, k, sc=k**-0.5), rnd(d, r, sc=0.3)
        close(_ops.lora_shrink(x, a, 2.0), reference.lora_shrink(x, a, 2.0), f"lora_shrink M={M}", 2e-2)
        y, u = rnd(M, d), rnd(M, r)
        close(_ops.lora_expand(y, u, b, 2.0), reference.lora_expand(y, u, b, 2.0), f"lora_expand M={M}", 2e-2)
    # lora_shrink's tensor-core kernel with k split over blocks (the last-block reduction: fences,
    # counters) and rank tiles of 32/64 with tails; a misaligned x (copied first).
    for M, k, r, off in ((20, 1024, 40, 0), (3, 2048, 16, 3))[: 1 if quick else 2]:
        x = rnd(M, k + off)[:, off:]
        a = rnd(r, k, sc=k**-0.5)
        close(_ops.lora_shrink(x, a, 2.0), reference.lora_shrink(x, a, 2.0), f"lora_shrink split-k M={M} k={k} r={r}", 2e-2)
    for rows, cols, bs, dq in ((33, 96, 64, True), (40, 160, 128, False), (5, 4128, 4096, True))[: 2 if quick else 3]:
        wt = rnd(rows, cols, dt=torch.float32, sc=cols**-0.5)
        packed, state = nf4.quantize(wt, bs, double_quant=dq)
        ref_packed, _ = reference.nf4_quantize(wt, bs)
        assert torch.equal(packed.cpu(), ref_packed), "nf4_quantize bytes"
        deq = nf4.dequantize(packed, state, bf)
        close(deq, reference.nf4_dequantize(packed, state), f"nf4 (de)quantize {rows}x{cols} bs={bs}", 1e-2)
        for M in (1, 16, 23) if quick else (1, 9, 16, 23):  # decode kernel (bf16, K % 32 == 0, M <= 16) and the slab path
            if no_cublas and M > 16:
                continue
            x = rnd(M, cols).requires_grad_()
            A, B = rnd(8, cols, sc=cols**-0.5).requires_grad_(), rnd(rows, 8, sc=0.3).requires_grad_()
            bias = rnd(rows)
            ref = reference.nf4_linear(x.detach(), packed, state, bias, A.detach(), B.detach(), 2.0)
            if no_cublas:
                nf4_args = _nf4_args("qlora_linear", x, packed, state)
                u = _ops.lora_shrink(x.detach(), A.detach(), 2.0)
                y = _ops.nf4_linear(x.detach(), *nf4_args, bias, u, B.detach())
                close(y, ref, f"nf4_linear + LoRA (decode kernel, lora_shrink's u) {rows}x{cols} M={M}", 2e-2)
                continue
            y = lora_fused.qlora_linear(x, packed, state, A, B, 2.0, bias)
            close(y.detach(), ref, f"qlora_linear {rows}x{cols} M={M}", 2e-2)
            gy = rnd(M, rows)
            (dx,) = torch.autograd.grad(y, [x], gy)
            close(dx, gy.double() @ (reference.nf4_dequantize(packed, state).to(dev)) + 2.0 * (gy.double() @ B.detach().double()) @ A.detach().double(),
                  f"qlora_linear dx {rows}x{cols} M={M}", 2e-2)
    # Both NF4 decode kernels, forced, on block-aligned shapes (blocksize 64, K % 256 == 0): the
    # block-aligned one's cp.async ring, also across strip boundaries (4500 rows: more 16-row strips
    # than an H100's 264 teams), scale copies, rows past N, warps without columns (K = 256, 512); the
    # LoRA term staged in shared memory (lora_B rows by cp.async + mbarrier), u given or from the shrink
    # kernel's partial sums (K = 2304: three slices) under programmatic dependent launch; the deferred
    # strip sums over about 6 strips a team (24000 rows: the mbarriers of the reduction buffers and of
    # the four lora_B buffers past their first phases).
    shapes = ((37, 512, 64, True), (4500, 256, 64, False), (19, 2304, 64, False), (24000, 256, 64, True))
    for rows, cols, bs, dq in shapes[: 2 if quick else 4]:
        wt = rnd(rows, cols, dt=torch.float32, sc=cols**-0.5)
        packed, state = nf4.quantize(wt, bs, double_quant=dq)
        nf4_args = _nf4_args("nf4_linear", rnd(1, cols), packed, state)
        # The block-aligned kernel with its 16-row steps (the default for weights this small) and 32.
        for kernel, step_rows in (("blockaligned", "16"), ("blockaligned", "32"), ("general", "16")):
            os.environ["LORA_FUSED_NF4_GEMV"] = kernel
            os.environ["LORA_FUSED_NF4_GEMV_ROWS"] = step_rows
            kernel = kernel if kernel == "general" else f"{kernel}, {step_rows} rows"
            for M in (1, 9):
                x, bias = rnd(M, cols), rnd(rows)
                y = _ops.nf4_linear(x, *nf4_args, bias, None, None)
                close(y, reference.nf4_linear(x, packed, state, bias), f"nf4 decode ({kernel}) {rows}x{cols} bs={bs} M={M}", 2e-2)
                A, B = rnd(16, cols, sc=cols**-0.5), rnd(rows, 16, sc=0.3)
                ref = reference.nf4_linear(x, packed, state, bias, A, B, 2.0)
                y = _ops.nf4_linear(x, *nf4_args, bias, _ops.lora_shrink(x, A, 2.0), B)
                close(y, ref, f"nf4 decode ({kernel}) + LoRA, u given {rows}x{cols} M={M}", 2e-2)
                # lora_A in place of lora_u: the shrink kernel on the block-aligned path. u comes from
                # a cuBLAS GEMM instead (so not under --no-cublas) on the general kernel, and where the
                # LoRA staging does not fit beside the ring: fp32 scales (4 KiB ring slots) with M > 8
                # and 16-row steps (233,056 bytes of shared memory against the H100's 232,448).
                if no_cublas and (kernel == "general" or (not dq and M > 8 and step_rows == "16")):
                    continue
                y = _ops.nf4_linear(x, *nf4_args, bias, None, B, A, 2.0)
                close(y, ref, f"nf4 decode ({kernel}) + LoRA, u from lora_A {rows}x{cols} M={M}", 2e-2)
        os.environ.pop("LORA_FUSED_NF4_GEMV")
        os.environ.pop("LORA_FUSED_NF4_GEMV_ROWS")
    print("sanitize slice: all kernels ran and matched float64", flush=True)


if __name__ == "__main__":
    main()
