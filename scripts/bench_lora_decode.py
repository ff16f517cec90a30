"""lora_decode (the fused bf16 LoRA decode kernels, M <= 16) on the GPU at hand, beside the cuBLAS base
GEMM x @ W^T alone (the goal: <= 1.0x of it) and eager PyTorch (base + LoRA as three GEMMs); also
each of its kernels forced (LORA_FUSED_DECODE_KERNEL=simt: CUDA-core dot products; =mma: tensor
cores; =bulk, sm_90 only: the weight by bulk copies), the default without programmatic dependent
launch (LORA_FUSED_PDL=0), and with --variants the bulk-copy kernel with its settings (bulk: its
defaults; rows=32: LORA_FUSED_DECODE_ROWS; stages=N: LORA_FUSED_DECODE_STAGES), mmah / simth (the
tensor-core / CUDA-core kernel with streaming hints on the weight's loads), mma-noh / simt-noh (either
without them; by default they are on where the weight is larger than L2), u1by1 (the default kernel,
its elements of u loaded one by one: LORA_FUSED_DECODE_U_TOGETHER=0).

    python scripts/bench_lora_decode.py [--M 1,2,4,8,16] [--shapes 4096:4096,8192:28672] [--r 16]
        [--variants rows=32,stages=3,stages=6]

CUDA-graph medians (triton.testing.do_bench_cudagraph); every result checked against float64 first.
Replays of one layer keep a weight smaller than L2 (4096->4096 bf16: 32 MiB of the H100's 50) in L2,
which a model's decode step does not (the other layers evict it); --cold times each column over
enough copies of the layer (weight, lora_A, lora_B) to fill L2 three times over, one call on each
copy in turn, and reports the time per call.
"""

import argparse

import torch
from bench_nf4_decode import checked_graph_us, rotating  # same folder: the same CUDA-graph timing

from lora_fused import _ops

SHAPES = "4096:4096,4096:11008,11008:4096,8192:8192,8192:28672"
# --variants by name besides the bulk-copy kernel's: either kernel with or without streaming hints.
NAMED_VARIANTS = {
    "mmah": {"LORA_FUSED_DECODE_KERNEL": "mma", "LORA_FUSED_DECODE_STREAM_HINTS": "1"},
    "simth": {"LORA_FUSED_DECODE_KERNEL": "simt", "LORA_FUSED_DECODE_STREAM_HINTS": "1"},
    "mma-noh": {"LORA_FUSED_DECODE_KERNEL": "mma", "LORA_FUSED_DECODE_STREAM_HINTS": "0"},
    "u1by1": {"LORA_FUSED_DECODE_U_TOGETHER": "0"},
    "simt-noh": {"LORA_FUSED_DECODE_KERNEL": "simt", "LORA_FUSED_DECODE_STREAM_HINTS": "0"},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", default="1,2,4,8,16")
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--variants", default="", help="each a column: bulk, rows=N, stages=N (the bulk-copy kernel), mmah, simth, mma-noh, simt-noh or u1by1")
    ap.add_argument("--brief", action="store_true", help="leave out the no-PDL and eager columns")
    ap.add_argument("--cold", action="store_true", help="rotate over copies of the layer that fill L2 three times")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    dt, r, s = torch.bfloat16, args.r, 2.0
    for shape in args.shapes.split(","):
        k, d = (int(v) for v in shape.split(":"))
        copies = 1
        if args.cold:
            copies = -(-3 * torch.cuda.get_device_properties(0).L2_cache_size // (d * k * 2))
        layers = [((torch.randn(d, k, device="cuda") * k**-0.5).to(dt), (torch.randn(r, k, device="cuda") * k**-0.5).to(dt),
                   (torch.randn(d, r, device="cuda") * 0.1).to(dt)) for _ in range(copies)]
        w, a, b = layers[-1]  # the copy whose result is checked: the last call's
        for m in (int(v) for v in args.M.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=dt)
            want_base = x.double() @ w.double().t()
            want = want_base + s * (x.double() @ a.double().t()) @ b.double().t()
            run = rotating(lambda L: _ops.lora_decode(x, *L, s), layers)
            # column: (function, reference, environment while it is captured)
            cols = {"lora_decode": (run, want, {}), "mma": (run, want, {"LORA_FUSED_DECODE_KERNEL": "mma"}),
                    "simt": (run, want, {"LORA_FUSED_DECODE_KERNEL": "simt"}), "no PDL": (run, want, {"LORA_FUSED_PDL": "0"})}
            for v in filter(None, args.variants.split(",")):
                env = {"LORA_FUSED_DECODE_KERNEL": "bulk"}
                if v in NAMED_VARIANTS:
                    env = NAMED_VARIANTS[v]
                elif v != "bulk":
                    key, val = v.split("=")
                    env[{"rows": "LORA_FUSED_DECODE_ROWS", "stages": "LORA_FUSED_DECODE_STAGES"}[key]] = val
                cols[v] = (run, want, env)
            cols["cuBLAS base"] = (rotating(lambda L: torch.mm(x, L[0].t()), layers), want_base, {})
            cols["eager"] = (rotating(lambda L: torch.mm(x, L[0].t()) + s * torch.mm(torch.mm(x, L[1].t()), L[2].t()), layers), want, {})
            if args.brief:
                cols = {n: c for n, c in cols.items() if n not in ("no PDL", "eager")}
            row, times = f"{k:>5}->{d:<5} M={m:<2} r={r}" + (f" cold({copies})" if args.cold else ""), {}
            for name, (fn, ref, env) in cols.items():
                times[name] = checked_graph_us(fn, ref, env, name) / copies
                row += f" | {name} {times[name]:6.1f} us"
            row += f" | lora_decode / base {times['lora_decode'] / times['cuBLAS base']:.2f}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
