"""Would decoding slab i + 1 on a second stream while slab i's GEMM runs hide the decode, as is or with
the GEMMs kept off a few SMs (torch's experimental SM carveout for cuBLAS)? A probe of the scheduling
alone, in torch around lora_fused's decode kernel: NF4 slabs decoded by lora_fused.nf4.dequantize
and multiplied by torch.mm, serially against two-stream variants, at the QLoRA shape 4096 -> 11008,
M = 4096, forward (slabs of rows) and backward (slabs of columns). A development tool.

    python scripts/probe_slab_overlap.py [--rounds 3] [--carveouts 8,16,24]
"""

import argparse
import statistics

import torch
from triton.testing import do_bench

from lora_fused import nf4


def make_case(m, k, n, slabs, backward, dt, dev):
    """x and the NF4 slabs (each quantized on its own: the decode kernel is the one the tiled path runs)."""
    w = torch.randn(n, k, device=dev, dtype=dt) * k**-0.5
    if backward:  # dX = dY @ W: slabs of columns of W, [n, c] each
        x = torch.randn(m, n, device=dev, dtype=dt)
        parts = [p.contiguous() for p in w.split((k + slabs - 1) // slabs, dim=1)]
        gemm = lambda a, ws, out: torch.mm(a, ws, out=out)
    else:  # y = x @ W^T: slabs of rows of W, [rows, k] each
        x = torch.randn(m, k, device=dev, dtype=dt)
        parts = list(w.split((n + slabs - 1) // slabs, dim=0))
        gemm = lambda a, ws, out: torch.mm(a, ws.t(), out=out)
    q = [nf4.quantize(p) for p in parts]
    outs = [torch.empty(m, (p.shape[1] if backward else p.shape[0]), device=dev, dtype=dt) for p in parts]
    ref = [gemm(x, nf4.dequantize(*qi), torch.empty_like(o)) for qi, o in zip(q, outs)]
    return x, q, outs, gemm, ref


def serial(x, q, outs, gemm):
    for qi, o in zip(q, outs):
        gemm(x, nf4.dequantize(*qi), o)


def overlapped(x, q, outs, gemm, decode_stream, gemm_stream):
    """Decode slab i + 1 on decode_stream while slab i's GEMM runs on gemm_stream (either may be the
    current stream); two slabs alive at most: decode i + 2 waits for GEMM i."""
    main = torch.cuda.current_stream()
    decode_stream.wait_stream(main)
    gemm_stream.wait_stream(main)
    done_gemm = [None] * len(q)
    slabs = [None] * len(q)
    ready = [None] * len(q)

    def decode(i):
        with torch.cuda.stream(decode_stream):
            if i >= 2:
                decode_stream.wait_event(done_gemm[i - 2])
            slabs[i] = nf4.dequantize(*q[i])
            ready[i] = torch.cuda.Event()
            ready[i].record(decode_stream)

    decode(0)
    for i in range(len(q)):
        if i + 1 < len(q):
            decode(i + 1)
        with torch.cuda.stream(gemm_stream):
            gemm_stream.wait_event(ready[i])
            gemm(x, slabs[i], outs[i])
            slabs[i].record_stream(gemm_stream)
            done_gemm[i] = torch.cuda.Event()
            done_gemm[i].record(gemm_stream)
        slabs[i] = None
    main.wait_stream(decode_stream)
    main.wait_stream(gemm_stream)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--carveouts", default="8,16,24",
                    help="SMs kept from the GEMMs (torch's experimental cuBLAS SM carveout) for the decodes")
    args = ap.parse_args()
    carveouts = [int(c) for c in args.carveouts.split(",") if c]
    if carveouts and not hasattr(torch._C, "_set_sm_carveout_experimental"):
        print("this torch has no SM carveout for cuBLAS: carveout variants skipped")
        carveouts = []

    def carved(c, fn):
        def run():
            torch._C._set_sm_carveout_experimental(c)
            try:
                fn()
            finally:
                torch._C._set_sm_carveout_experimental(None)
        return run

    torch.manual_seed(0)
    dt, dev = torch.bfloat16, "cuda"
    side_same = torch.cuda.Stream(priority=0)
    side_high = torch.cuda.Stream(priority=-1)
    print(f"{torch.cuda.get_device_name()}; stream priorities: side_same 0, side_high -1")
    m, k, n = 4096, 4096, 11008
    for backward in (False, True):
        for slabs in (4, 8):
            x, q, outs, gemm, ref = make_case(m, k, n, slabs, backward, dt, dev)
            main_s = torch.cuda.current_stream()
            variants = {
                "serial": lambda: serial(x, q, outs, gemm),
                "decode on side stream": lambda: overlapped(x, q, outs, gemm, side_same, main_s),
                "GEMM on high-priority side": lambda: overlapped(x, q, outs, gemm, main_s, side_high),
                "decodes alone": lambda: [nf4.dequantize(*qi) for qi in q],
                "GEMMs alone": lambda: [gemm(x, r_, o) for r_, o in zip(slabs_bf16, outs)],
            }
            for c in carveouts:
                # The GEMMs on all but c SMs, so that the next slab's decode (side stream) has SMs of its own.
                variants[f"decode on side, GEMM carveout {c}"] = carved(
                    c, lambda: overlapped(x, q, outs, gemm, side_same, main_s))
                variants[f"GEMMs alone, carveout {c}"] = carved(
                    c, lambda: [gemm(x, r_, o) for r_, o in zip(slabs_bf16, outs)])
            slabs_bf16 = [nf4.dequantize(*qi) for qi in q]
            for name in [v for v in variants if "alone" not in v]:
                for o in outs:
                    o.fill_(float("nan"))
                variants[name]()
                torch.cuda.synchronize()
                for o, r_ in zip(outs, ref):  # another SM count may pick another cuBLAS kernel: close, not equal
                    torch.testing.assert_close(o, r_, rtol=2e-2, atol=2e-2, msg=name)
            times = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    times[name].append(do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3)
            what = f"{'backward dX' if backward else 'forward y'} M={m} {k}->{n}, {slabs} slabs"
            print(f"{what}: medians over {args.rounds} interleaved rounds (us)")
            for name in variants:
                print(f"  {name:36s} {statistics.median(times[name]):8.1f}")
            del x, q, outs, ref, slabs_bf16


if __name__ == "__main__":
    main()
