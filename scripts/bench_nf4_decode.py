"""NF4 decode (nf4_linear at M <= 16) on the GPU at hand: the block-aligned kernel (the default for
K % blocksize == 0) beside the general one (LORA_FUSED_NF4_GEMV=general), bitsandbytes' gemv when
installed, and cuBLAS bf16 x @ W^T, with the fraction of the measured copy bandwidth each reaches.

    python scripts/bench_nf4_decode.py [--M 1,4,8,16] [--shapes 4096:4096,8192:28672] [--rows] [--slots] [--barriers] [--serpentine]

--rows adds the block-aligned kernel forced to 16 and to 32 weight rows per warp step
(LORA_FUSED_NF4_GEMV_ROWS), --slots 32 rows with 3 ring slots (LORA_FUSED_NF4_GEMV_SLOTS; the
default is 2), --barriers the strip sums made with the team's barriers instead of deferred
(LORA_FUSED_NF4_GEMV_DEFER=0), --serpentine every strip forwards over K
(LORA_FUSED_NF4_GEMV_SERPENTINE=0; by default a team's strips alternate), each timed beside the default choice.

Kernel times are CUDA-graph replays (triton.testing.do_bench_cudagraph, median), so the host's
launch cost is not in them; every result is checked against x @ dequantize(W).T first.
"""

import argparse
import os

import torch
import triton.testing as tt

import lora_fused
from lora_fused import nf4
from lora_fused.bench import measure_ceilings

SHAPES = "4096:4096,4096:11008,11008:4096,4096:14336,8192:8192,8192:28672"


def graph_us(fn):
    return tt.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


def checked_graph_us(fn, ref, env, name):
    """graph_us(fn) under the environment variables env (read as the graph is captured, then removed),
    after fn's result is checked against ref (float64): relative max error under 2e-2."""
    os.environ.update(env)
    try:
        err = (fn().double() - ref).abs().max().item() / ref.abs().max().item()
        assert err < 2e-2, (name, err)
        return graph_us(fn)
    finally:
        for key in env:
            os.environ.pop(key, None)


def rotating(call, layers):
    """A function that calls call(layer) on each of layers in turn (copies of a layer that together
    overflow L2, for cold-L2 timings) and returns the last result."""

    def fn():
        for layer in layers:
            out = call(layer)
        return out

    return fn


def weight_bytes(packed, state):
    n = packed.numel() + state.absmax.numel() * state.absmax.element_size()
    if state.state2 is not None:
        n += state.state2.absmax.numel() * 4 + state.state2.code.numel() * 4
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", default="1,4,8,16")
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--rows", action="store_true", help="also time 16 and 32 rows per warp step")
    ap.add_argument("--slots", action="store_true", help="also time 32 rows per warp step with 3 ring slots")
    ap.add_argument("--barriers", action="store_true", help="also time the strip sums with the team's barriers")
    ap.add_argument("--serpentine", action="store_true", help="also time every strip forwards over K (the default alternates)")
    args = ap.parse_args()
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    bw = measure_ceilings("cuda", lambda fn: tt.do_bench(fn, warmup=10, rep=40, return_mode="median"))["copy_TBps"] * 1e12
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "copy bandwidth %.0f GB/s" % (bw / 1e9),
          "bitsandbytes", getattr(bnb, "__version__", "not installed"))
    dt = torch.bfloat16
    for shape in args.shapes.split(","):
        k, d = (int(v) for v in shape.split(":"))
        w = torch.randn(d, k, device="cuda") * k**-0.5
        packed, state = nf4.quantize(w, blocksize=64, double_quant=True)
        wq = nf4.dequantize(packed, state, dt)
        wbytes = weight_bytes(packed, state)
        if bnb is not None:
            bq, bstate = bnb.functional.quantize_4bit(w.to(dt), blocksize=64, compress_statistics=True, quant_type="nf4")
        for m in (int(v) for v in args.M.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=dt)
            want = (x.double() @ wq.double().t())
            row = f"{k:>5}->{d:<5} M={m:<2}"
            times = {}
            # name: the environment it runs under (LORA_FUSED_NF4_GEMV_<key>)
            variants = {"blockaligned": {"": "blockaligned"}, "general": {"": "general"}}
            if args.rows:
                variants.update({"rows16": {"": "blockaligned", "ROWS": "16"}, "rows32": {"": "blockaligned", "ROWS": "32"}})
            if args.slots:
                variants.update({"rows32_3slots": {"": "blockaligned", "ROWS": "32", "SLOTS": "3"}})
            if args.barriers:
                variants.update({"barriers": {"": "blockaligned", "DEFER": "0"}})
            if args.serpentine:
                variants.update({"forward": {"": "blockaligned", "SERPENTINE": "0"}})
            knobs = {key for env in variants.values() for key in env}
            for name, env in variants.items():
                for key in knobs:
                    var = "LORA_FUSED_NF4_GEMV" + (f"_{key}" if key else "")
                    if key in env:
                        os.environ[var] = env[key]
                    else:
                        os.environ.pop(var, None)
                fn = lambda: lora_fused.nf4_linear(x, packed, state)
                err = (fn().double() - want).abs().max().item() / want.abs().max().item()
                assert err < 2e-2, (name, err)
                times[name] = graph_us(fn)
                row += f" | {name} {times[name]:7.1f} us {wbytes / times[name] / 1e3:6.0f} GB/s ({wbytes / times[name] * 1e6 / bw:4.0%}) err {err:.1e}"
            for key in knobs:
                os.environ.pop("LORA_FUSED_NF4_GEMV" + (f"_{key}" if key else ""), None)
            cub = graph_us(lambda: x @ wq.t())
            row += f" | cuBLAS bf16 {cub:7.1f} us ({cub / times['blockaligned']:.2f}x)"
            if bnb is not None:
                bfn = lambda: bnb.matmul_4bit(x, bq.t(), bstate)
                bwant = x.double() @ bnb.functional.dequantize_4bit(bq, bstate).double().t()
                assert (bfn().double() - bwant).abs().max().item() / bwant.abs().max().item() < 2e-2
                bt = graph_us(bfn)
                row += f" | bnb {bt:7.1f} us ({bt / times['blockaligned']:.2f}x)"
            print(row, flush=True)


if __name__ == "__main__":
    main()
