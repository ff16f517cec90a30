"""Probe of NF4 whole-weight dequantization speed (development tool, GPU): lora_fused.nf4.dequantize
beside the variants in scripts/probe_nf4_dequantize/variants.cu (built here with
torch.utils.cpp_extension), each checked bit-exact against nf4.dequantize first, timed as
device-event medians, as TB/s of bytes read + written and as a fraction of a device copy's rate.

    python scripts/probe_nf4_dequantize.py [--shapes 11008:4096,28672:8192] [--variants 0,2,6,18,22]

A variant is a bit field: 1 unroll 8 (else 4), 2 resident grid, 4 scale shuffled from one lane of
8, 8 pair table (byte -> two levels), 16 bf16x2 conversion, 32 streaming stores, 64 two adjacent
groups per thread, 128 no decode (the same bytes moved: the ceiling of this traffic; not checked).
"""

import argparse
import os

import torch
import triton.testing as tt
from torch.utils.cpp_extension import load

from lora_fused import nf4

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = {1: "unroll8", 2: "resident", 4: "shfl-scale", 8: "pair-lut", 16: "cvt2", 32: "stream", 64: "pair-group", 128: "no-decode"}


def variant_name(v):
    return "+".join(n for b, n in NAMES.items() if v & b) or "base"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="11008:4096,28672:8192")
    ap.add_argument("--variants", default="6,22,38,134,166")
    ap.add_argument("--blocks-per-sm", default="0", help="caps on resident blocks per SM to try (0: occupancy)")
    args = ap.parse_args()
    ext = load(
        name="probe_nf4_dequantize_variants",
        sources=[os.path.join(HERE, "probe_nf4_dequantize", "variants.cu")],
        extra_include_paths=[os.path.join(HERE, "..", "csrc")],
        extra_cuda_cflags=["-O3", "--fmad=false", "-gencode=arch=compute_90a,code=sm_90a"],
        verbose=False,
    )
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split(":"))
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        packed, state = nf4.quantize(w)
        s2 = state.state2
        ref = nf4.dequantize(packed, state, torch.bfloat16)
        nbytes = packed.numel() + ref.numel() * 2
        src = torch.randn(n * k, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        copy_ms = tt.do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
        copy_tbs = 2 * src.numel() * 2 / copy_ms / 1e9
        fill_ms = tt.do_bench(lambda: dst.fill_(1.0), warmup=25, rep=200)
        read_ms = tt.do_bench(lambda: src.sum(dtype=torch.float32), warmup=25, rep=200)
        print(f"{n}x{k}: write-only fill {dst.numel() * 2 / fill_ms / 1e9:.2f} TB/s, read-only sum "
              f"{src.numel() * 2 / read_ms / 1e9:.2f} TB/s, copy {copy_tbs:.2f} TB/s; a dequantize moving "
              f"{packed.numel()} read + {ref.numel() * 2} written bytes at those rates would take "
              f"{(packed.numel() / (src.numel() * 2 / read_ms) + ref.numel() * 2 / (dst.numel() * 2 / fill_ms)) * 1e3:.1f} us")
        ours_ms = tt.do_bench(lambda: nf4.dequantize(packed, state, torch.bfloat16), warmup=25, rep=200)
        print(f"{n}x{k}: copy {copy_tbs:.2f} TB/s; nf4.dequantize {ours_ms * 1e3:.1f} us "
              f"{nbytes / ours_ms / 1e9:.2f} TB/s = {nbytes / ours_ms / 1e9 / copy_tbs:.1%} of copy")
        for cap in (int(c) for c in args.blocks_per_sm.split(",")):
            for v in (int(x) for x in args.variants.split(",")):
                if cap and not v & 2:
                    continue
                fn = lambda: ext.dequant(packed, state.absmax, s2.absmax, s2.code, state.offset, 64, n, k, v, cap)
                got = fn()
                if not v & 128 and not torch.equal(got, ref):
                    print(f"  variant {v:2d} {variant_name(v):40s} WRONG ({(got != ref).sum().item()} elements differ)")
                    continue
                ms = tt.do_bench(fn, warmup=25, rep=200)
                tbs = nbytes / ms / 1e9
                print(f"  variant {v:2d} {variant_name(v):40s} cap {cap}: {ms * 1e3:7.1f} us {tbs:.2f} TB/s = "
                      f"{tbs / copy_tbs:.1%} of copy", flush=True)


if __name__ == "__main__":
    main()
