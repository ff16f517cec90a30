"""Probe of the NF4 Hopper GEMM (lora_fused::nf4_gemm_sm90: 128x128 and 128x256 tiles, the weight as
bitsandbytes packs it and reordered by nf4_repack_sm90):
its accuracy against float64 and its speed beside cuBLAS bf16 (x @ W^T with the 16-bit weight) and
nf4_linear's slab path (dequantize slabs into cuBLAS) and its default path, on a Hopper GPU.

    python scripts/probe_nf4_gemm_sm90.py [--M 16,64,128,256,512,1024,2048,4096] [--shapes 4096:4096,8192:8192]

Its scales are bf16 per 64-element group (the double-quantized absmax decoded once, as a layer would
keep them), so it rounds level * scale differently from nf4_linear (fp32 product rounded once): the
check is the error against float64 of the GEMM with those bf16 scales, and beside it the error of
cuBLAS on the dequantized bf16 weight.
"""

import argparse
import os

import torch
import triton.testing as tt

import lora_fused
from lora_fused import nf4

LEVELS = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
          -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
          0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
          0.7229568362236023, 1.0]


def block_scales(state):
    """fp32 absmax per 64-element block (double quantization decoded)."""
    if state.state2 is None:
        return state.absmax.float()
    s2 = state.state2
    return s2.code[state.absmax.long()] * s2.absmax.repeat_interleave(s2.blocksize)[: state.absmax.numel()] + state.offset


def codes(packed, n, k):
    b = packed.view(-1)
    c = torch.stack([b >> 4, b & 15], dim=1).view(-1)[: n * k]
    return c.view(n, k).long()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", default="16,64,128,256,512,1024,2048,4096")
    ap.add_argument("--shapes", default="4096:4096,4096:11008,11008:4096,8192:28672")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, lora_fused.build_info())
    op = torch.ops.lora_fused.nf4_gemm_sm90
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split(":"))
        w = torch.randn(n, k, device="cuda") * k**-0.5
        packed, state = nf4.quantize(w, blocksize=64)
        scales = block_scales(state).to(torch.bfloat16).view(n, k // 64).t().contiguous()  # [K / 64, N]
        lv = torch.tensor(LEVELS, device="cuda").to(torch.bfloat16).double()
        w_used = lv[codes(packed, n, k)] * scales.t().double().repeat_interleave(64, dim=1)
        w16 = nf4.dequantize(packed, state, torch.bfloat16)
        packed_s = torch.ops.lora_fused.nf4_repack_sm90(packed, n, k)  # the Shuffled GEMMs' layout
        w_true = nf4.dequantize(packed, state, torch.float32).double()  # the format's exact weight
        for m in (int(v) for v in args.M.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = op(x, packed, scales, n)
            ref = x.double() @ w_used.t()
            err = ((y.double() - ref).norm() / ref.norm()).item()
            err_cublas = (((x @ w16.t()).double() - x.double() @ w16.double().t()).norm() / ref.norm()).item()
            assert torch.isfinite(y).all() and err < 4 * err_cublas + 1e-6, (shape, m, err, err_cublas)
            # Against the format's weight (what nf4_linear must meet): ours vs PyTorch's bf16 matmul.
            ref_true = x.double() @ w_true.t()
            e_true = ((y.double() - ref_true).norm() / ref_true.norm()).item()
            e_torch = (((x @ w16.t()).double() - ref_true).norm() / ref_true.norm()).item()
            t_op = tt.do_bench(lambda: op(x, packed, scales, n), return_mode="median") * 1e3
            variants = {}  # (tile_tokens, shuffled) -> us, each checked first
            for tile, shuf in ((256, False), (128, True), (256, True)):
                wv = packed_s if shuf else packed
                yv = op(x, wv, scales, n, tile, shuf)
                ev = ((yv.double() - ref).norm() / ref.norm()).item()
                assert torch.isfinite(yv).all() and ev < 4 * err_cublas + 1e-6, (shape, m, tile, shuf, ev)
                variants[(tile, shuf)] = tt.do_bench(lambda: op(x, wv, scales, n, tile, shuf), return_mode="median") * 1e3
            t_cublas = tt.do_bench(lambda: x @ w16.t(), return_mode="median") * 1e3
            os.environ["LORA_FUSED_NF4_GEMM"] = "slab"  # the slab path (M > 16), whatever nf4_linear picks by default
            t_nf4 = tt.do_bench(lambda: lora_fused.nf4_linear(x, packed, state), return_mode="median") * 1e3
            del os.environ["LORA_FUSED_NF4_GEMM"]
            t_auto = tt.do_bench(lambda: lora_fused.nf4_linear(x, packed, state), return_mode="median") * 1e3
            print(f"{k:>5}->{n:<5} M={m:<5} err {err:.1e} (cuBLAS {err_cublas:.1e}) vs format {e_true:.1e} (torch {e_torch:.1e}, "
                  f"{e_true / e_torch:.2f}x) | nf4_gemm_sm90 {t_op:8.1f} us, 128x256 {variants[(256, False)]:8.1f}, "
                  f"shuffled 128x128 {variants[(128, True)]:8.1f}, 128x256 {variants[(256, True)]:8.1f} | "
                  f"cuBLAS bf16 {t_cublas:8.1f} us ({t_cublas / t_op:.2f}x) | slab path {t_nf4:8.1f} us ({t_nf4 / t_op:.2f}x) "
                  f"| nf4_linear (default path) {t_auto:8.1f} us, {t_cublas / t_auto:.2f}x cuBLAS's speed",
                  flush=True)


if __name__ == "__main__":
    main()
