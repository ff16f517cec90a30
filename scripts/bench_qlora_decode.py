"""Where the QLoRA decode time goes beyond the NF4 matmul (M <= 16), on the GPU at hand: qlora_linear
(inference: nf4_linear with lora_A, u made by the op's shrink kernel) beside nf4_linear alone,
nf4_linear given u from cuBLAS mm + scale (the path before), nf4_linear given a u made beforehand
(u ready: the decode kernel's LoRA staging and epilogue alone, no shrink), the shrink alone two ways (cuBLAS
mm + scale, and lora_fused's own lora_shrink kernel), qlora_linear without programmatic dependent
launch (LORA_FUSED_PDL=0), qlora_linear and nf4_linear with the decode kernel's strip sums made
with the team's barriers instead of deferred (LORA_FUSED_NF4_GEMV_DEFER=0), qlora_linear with the
shrink in blocks of 8 warps instead of 32 (LORA_FUSED_LORA_SHRINK_WARPS=8), and qlora_linear and
nf4_linear with 32-row warp steps (LORA_FUSED_NF4_GEMV_ROWS=32; the default below 2^25 weights is 16,
except where 16-row steps have no room for the LoRA staging, as at r = 64 with 16 tokens), qlora_linear
with 16-row steps forced (LORA_FUSED_NF4_GEMV_ROWS=16: there the LoRA term read from global memory), and qlora_linear and u ready with u's
elements staged one by one (LORA_FUSED_NF4_GEMV_U_TOGETHER=0). Ratios: / nf4.

    python scripts/bench_qlora_decode.py [--M 1,16] [--shapes 4096:11008,8192:28672] [--r 16] [--cold]
                                         [--columns "qlora,nf4,u ready"]

CUDA-graph medians (triton.testing.do_bench_cudagraph); results are checked against float64 first.
Replays of one layer keep an NF4 weight smaller than L2 there (4096->4096: 8 MiB); --cold times each
column over enough copies of the layer (NF4 weight, lora_A, lora_B) to fill L2 three times over, one
call on each copy in turn, as a model's decode step meets them, and reports the time per call.
"""

import argparse

import torch
from bench_nf4_decode import checked_graph_us, rotating  # same folder: the same CUDA-graph timing

import lora_fused
from lora_fused import _ops, nf4
from lora_fused.functional import _nf4_args, _scaled_mm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", default="1,16")
    ap.add_argument("--shapes", default="4096:4096,4096:11008,8192:28672")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--cold", action="store_true", help="rotate over copies of the layer that fill L2 three times")
    ap.add_argument("--columns", default="", help="comma-separated columns to time (default: all)")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    dt, r, s = torch.bfloat16, args.r, 2.0
    for shape in args.shapes.split(","):
        k, d = (int(v) for v in shape.split(":"))
        copies = -(-3 * torch.cuda.get_device_properties(0).L2_cache_size // (d * k // 2)) if args.cold else 1
        layers = []
        for _ in range(copies):
            packed, state = nf4.quantize(torch.randn(d, k, device="cuda") * k**-0.5, blocksize=64)
            layers.append({"packed": packed, "state": state, "a": (torch.randn(r, k, device="cuda") * k**-0.5).to(dt),
                           "b": (torch.randn(d, r, device="cuda") * 0.1).to(dt)})
        last = layers[-1]  # the copy whose result is checked: the last call's
        wq = nf4.dequantize(last["packed"], last["state"], dt).double()
        for m in (int(v) for v in args.M.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=dt)
            for L in layers:
                L["nf4_args"] = _nf4_args("nf4_linear", x, L["packed"], L["state"])
                L["u_ready"] = _scaled_mm(x, L["a"].t(), s)
            want_u = s * (x.double() @ last["a"].double().t())
            want = x.double() @ wq.t() + (want_u @ last["b"].double().t())
            fns = {
                "qlora": rotating(lambda L: lora_fused.qlora_linear(x, L["packed"], L["state"], L["a"], L["b"], s, training=False), layers),
                "nf4": rotating(lambda L: lora_fused.nf4_linear(x, L["packed"], L["state"]), layers),
                "u given": rotating(lambda L: _ops.nf4_linear(x, *L["nf4_args"], None, _scaled_mm(x, L["a"].t(), s), L["b"]), layers),
                "u ready": rotating(lambda L: _ops.nf4_linear(x, *L["nf4_args"], None, L["u_ready"], L["b"]), layers),
                "shrink mm": rotating(lambda L: _scaled_mm(x, L["a"].t(), s), layers),
                "shrink op": rotating(lambda L: _ops.lora_shrink(x, L["a"], s), layers),
            }
            refs = {"qlora": want, "u given": want, "u ready": want, "nf4": x.double() @ wq.t(), "shrink mm": want_u, "shrink op": want_u}
            row = f"{k:>5}->{d:<5} M={m:<2} r={r}" + (f" cold({copies})" if args.cold else "")
            # name: (the op it times, under these environment variables' values)
            envs = {"qlora no PDL": ("qlora", {"LORA_FUSED_PDL": "0"}),
                    "qlora barriers": ("qlora", {"LORA_FUSED_NF4_GEMV_DEFER": "0"}),
                    "nf4 barriers": ("nf4", {"LORA_FUSED_NF4_GEMV_DEFER": "0"}),
                    "qlora 8-warp shrink": ("qlora", {"LORA_FUSED_LORA_SHRINK_WARPS": "8"}),
                    # 32-row warp steps where the default takes 16 (under 2^25 weights, where they
                    # have room for the LoRA staging), and 16 where it takes 32 for the staging
                    "qlora 32 rows": ("qlora", {"LORA_FUSED_NF4_GEMV_ROWS": "32"}),
                    "nf4 32 rows": ("nf4", {"LORA_FUSED_NF4_GEMV_ROWS": "32"}),
                    "qlora 16 rows": ("qlora", {"LORA_FUSED_NF4_GEMV_ROWS": "16"}),
                    # u's elements staged one by one, a round trip each (before session 36)
                    "qlora u 1-by-1": ("qlora", {"LORA_FUSED_NF4_GEMV_U_TOGETHER": "0"}),
                    "u ready 1-by-1": ("u ready", {"LORA_FUSED_NF4_GEMV_U_TOGETHER": "0"})}
            times = {}
            for name, (op, _) in envs.items():
                fns[name] = fns[op]
                refs[name] = refs[op]
            wanted = [c.strip() for c in args.columns.split(",") if c.strip()]
            unknown = sorted(set(wanted) - set(fns))
            if unknown:
                raise SystemExit(f"unknown columns {unknown}; known: {sorted(fns)}")
            for name, fn in fns.items():
                if wanted and name not in wanted:
                    continue
                env = envs[name][1] if name in envs else {}
                times[name] = checked_graph_us(fn, refs[name], env, name) / copies
                row += f" | {name} {times[name]:6.1f} us"
            ratios = [("qlora/nf4", "qlora", "nf4"), ("with barriers", "qlora barriers", "nf4 barriers"),
                      ("u ready/nf4", "u ready", "nf4"), ("with the 8-warp shrink", "qlora 8-warp shrink", "nf4"),
                      ("with 32-row steps", "qlora 32 rows", "nf4"), ("nf4 alone with 32-row steps", "nf4 32 rows", "nf4"),
                      ("with 16-row steps", "qlora 16 rows", "nf4"), ("u one by one", "qlora u 1-by-1", "nf4"),
                      ("u ready one by one", "u ready 1-by-1", "nf4")]
            row += " | " + ", ".join(f"{label} {times[a] / times[b]:.3f}" for label, a, b in ratios if a in times and b in times)
            print(row, flush=True)


if __name__ == "__main__":
    main()
