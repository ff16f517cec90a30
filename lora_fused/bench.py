"""python -m lora_fused.bench: lora_fused beside eager PyTorch, PEFT and bitsandbytes, on the GPU at hand.

Modes: fwd is inference (no autograd graph; on CUDA timed as CUDA-graph replays), bwd the backward of a recorded forward, fwdbwd a
training step's forward and backward. Every case is checked against an fp32 reference before it is timed (a wrong result is reported as
WRONG, never as a time); times are device-event medians (triton.testing.do_bench) after warm-up, on
random data, all providers measured in this one process. Ratios are provider time / lora_fused time
(> 1: lora_fused is faster). Without a GPU the CPU implementations run on small shapes; those
figures say nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import lora_fused
from lora_fused import nf4, reference
from lora_fused.bench_report import MODES, Result, add_speedups, format_table, write_markdown, write_plot

# Layer shapes (in_features -> out_features) of common models: Llama 7B/8B/70B (and 8192 -> 8192).
SHAPES_FULL = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (4096, 14336), (8192, 28672)]
M_FULL = [1, 16, 512, 4096, 16384]
R_FULL = [8, 16, 64]
SHAPES_QUICK = [(4096, 4096), (4096, 11008)]
M_QUICK = [1, 16, 4096]
R_QUICK = [16]
SHAPES_CPU = [(256, 384)]
M_CPU = [1, 64]
R_CPU = [8]
OPS = ["lora_linear", "nf4_linear", "qlora_linear", "nf4_dequantize"]
LAYER_OPS = ("lora_linear", "nf4_linear", "qlora_linear")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------- timing


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=10, rep=40, return_mode="median"))

    def cpu_median_ms(fn):
        fn()
        times = []
        deadline = time.perf_counter() + 0.5
        while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 100):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    return cpu_median_ms


def _graph_timer(device: str, bench) -> Callable[[Callable[[], object]], tuple[float, str]]:
    """Inference forward timed as CUDA-graph replays, as decode is served: at a few tokens the
    launches, not the kernels, would otherwise be measured. Falls back to plain timing (and says
    so) for a provider that cannot be captured."""
    if device != "cuda":
        return lambda fn: (bench(fn), "")
    from triton.testing import do_bench_cudagraph

    def timed(fn):
        try:
            return float(do_bench_cudagraph(fn, rep=40, return_mode="median")), "graph"
        except Exception as e:  # noqa: BLE001
            torch.cuda.synchronize()
            return bench(fn), f"no graph ({type(e).__name__})"

    return timed


def measure_ceilings(device: str, bench) -> dict:
    """Copy bandwidth (bytes read + written per second) and the bf16 GEMM rate, measured here."""
    if device != "cuda":
        return {}
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_ms = bench(lambda: a @ b)
    del src, dst, a, b
    return {"copy_TBps": 2 * (1 << 30) / copy_ms / 1e9, "bf16_gemm_TFLOPs": 2 * n**3 / mm_ms / 1e9}


# ------------------------------------------------------------------------------------ lora_linear cases


def _peft_layer(weight, lora_A, lora_B, alpha):
    """PEFT's own LoRA layer (get_peft_model + LoraConfig, its defaults), with our adapter weights."""
    from peft import LoraConfig, get_peft_model

    d, k = weight.shape
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(k, d, bias=False, device=weight.device, dtype=weight.dtype)
    holder.proj.weight.data = weight
    model = get_peft_model(holder, LoraConfig(r=lora_A.shape[0], lora_alpha=alpha, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
    return layer


def lora_linear_providers(x, weight, lora_A, lora_B, scaling, alpha, with_peft: bool):
    """name -> (forward function, the tensors whose gradients a training step needs)."""
    A = lora_A.detach().requires_grad_()
    B = lora_B.detach().requires_grad_()
    xg = x.detach().requires_grad_()
    providers = {
        "lora_fused": (lambda: lora_fused.lora_linear(xg, weight, A, B, scaling), [xg, A, B]),
        "torch": (lambda: F.linear(xg, weight) + scaling * F.linear(F.linear(xg, A), B), [xg, A, B]),
        "base_gemm": (lambda: F.linear(xg, weight), [xg]),
    }
    if with_peft:
        layer = _peft_layer(weight, lora_A, lora_B, alpha)
        pa, pb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        providers["peft"] = (lambda: layer(xg), [xg, pa, pb])
    return providers


def _bnb_linear4bit(packed, state, k, d, dtype):
    """A bitsandbytes Linear4bit holding exactly our NF4 bytes (as transformers loads a checkpoint)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(k, d, bias=False, compute_dtype=dtype, quant_type="nf4", device="meta")
    stats = state.as_dict(packed=True)
    layer.weight = bnb.nn.Params4bit.from_prequantized(packed, stats, device=packed.device, module=layer)
    return layer


def nf4_linear_providers(x, packed, state, w16, with_bnb: bool):
    xg = x.detach().requires_grad_()
    providers = {
        "lora_fused": (lambda: lora_fused.nf4_linear(xg, packed, state), [xg]),
        "base_gemm": (lambda: F.linear(xg, w16), [xg]),
    }
    if with_bnb:
        layer = _bnb_linear4bit(packed, state, x.shape[1], w16.shape[0], x.dtype)
        providers["bitsandbytes"] = (lambda: layer(xg), [xg])
    return providers


def qlora_linear_providers(x, packed, state, w16, lora_A, lora_B, scaling, alpha, with_peft: bool, with_bnb: bool):
    A = lora_A.detach().requires_grad_()
    B = lora_B.detach().requires_grad_()
    xg = x.detach().requires_grad_()
    providers = {
        "lora_fused": (lambda: lora_fused.qlora_linear(xg, packed, state, A, B, scaling), [xg, A, B]),
        "base_gemm": (lambda: F.linear(xg, w16), [xg]),  # the bf16 base alone, no LoRA: the goal's yardstick
    }
    if with_bnb:
        layer = _bnb_linear4bit(packed, state, x.shape[1], w16.shape[0], x.dtype)
        providers["bnb+torch"] = (lambda: layer(xg) + scaling * F.linear(F.linear(xg, A), B), [xg, A, B])
        if with_peft:
            from peft import LoraConfig, get_peft_model

            holder = torch.nn.Module()
            holder.proj = layer
            model = get_peft_model(holder, LoraConfig(r=lora_A.shape[0], lora_alpha=alpha, target_modules=["proj"]))
            pl = model.base_model.model.proj
            with torch.no_grad():
                pl.lora_A["default"].weight.copy_(lora_A)
                pl.lora_B["default"].weight.copy_(lora_B)
            providers["peft+bnb"] = (lambda: pl(xg), [xg, pl.lora_A["default"].weight, pl.lora_B["default"].weight])
    return providers


def run_layer(op, M, k, d, r, dtype, device, modes, bench, graph_bench, with_peft, with_bnb) -> list[Result]:
    """One layer case (lora_linear, nf4_linear or qlora_linear): every provider checked against an
    fp32 reference, then timed for each mode."""
    r = max(r, 1)  # nf4_linear cases carry r = 0 (no adapter)
    x = torch.randn(M, k, device=device, dtype=dtype)
    weight = torch.randn(d, k, device=device, dtype=dtype) * k**-0.5
    lora_A = torch.randn(r, k, device=device, dtype=dtype) * k**-0.5
    lora_B = torch.randn(d, r, device=device, dtype=dtype) * r**-0.5  # nonzero: the branch must count
    alpha = 2 * r
    scaling = alpha / r
    g = torch.randn(M, d, device=device, dtype=dtype)
    if op == "lora_linear":
        w_ref = weight.float()
        providers = lora_linear_providers(x, weight, lora_A, lora_B, scaling, alpha, with_peft)
    else:
        packed, state = nf4.quantize(weight, 64)
        w16 = nf4.dequantize(packed, state, dtype)
        w_ref = nf4.dequantize(packed, state, torch.float32)
        if op == "nf4_linear":
            providers = nf4_linear_providers(x, packed, state, w16, with_bnb)
        else:
            providers = qlora_linear_providers(x, packed, state, w16, lora_A, lora_B, scaling, alpha, with_peft, with_bnb)
    has_lora = op != "nf4_linear"
    # fp32 reference (TF32 off) for the output and the input gradient.
    xr = x.float().requires_grad_()
    with _no_tf32():
        ref_base = F.linear(xr, w_ref)
        ref = ref_base + scaling * F.linear(F.linear(xr, lora_A.float()), lora_B.float()) if has_lora else ref_base
        (ref_dx,) = torch.autograd.grad(ref, xr, g.float(), retain_graph=True)
        (ref_base_dx,) = torch.autograd.grad(ref_base, xr, g.float())
    weight_bytes = d * k * (dtype.itemsize if op == "lora_linear" else 0.5)
    results = []
    for name, (fwd, params) in providers.items():
        base = name == "base_gemm"
        expected, expected_dx = (ref_base, ref_base_dx) if base else (ref, ref_dx)
        for mode in modes:
            res = Result(op, mode, name, M, k, d, r if has_lora else 0, _dtype_name(dtype))
            try:
                y = fwd()
                err = _rel(y, expected.detach())
                if mode != "fwd":
                    grads = torch.autograd.grad(y, params, g)
                    err = max(err, _rel(grads[0], expected_dx))
                res.rel_err = err
                if not err <= _tolerance(dtype):
                    res.status, res.detail = "WRONG", f"relative error {err:.2e} > {_tolerance(dtype):.0e}"
                    results.append(res)
                    continue
                if mode == "fwd":  # inference: no autograd graph, CUDA-graph replays, for every provider alike
                    with torch.no_grad():
                        res.ms, res.detail = graph_bench(fwd)
                elif mode == "bwd":
                    y = fwd()
                    res.ms = bench(lambda: torch.autograd.grad(y, params, g, retain_graph=True))
                else:
                    res.ms = bench(lambda: torch.autograd.grad(fwd(), params, g))
                # The frozen weight gets no gradient: backward is one base-sized GEMM (dX), not two.
                flops = 2 * M * k * d * (2 if mode == "fwdbwd" else 1)
                res.tflops = flops / res.ms / 1e9
                if mode == "fwd" and M <= 16:  # decode is memory-bound: the weight's bytes per second
                    wb = d * k * dtype.itemsize if base else weight_bytes
                    res.tbps = wb / res.ms / 1e9
            except Exception as e:  # a provider that fails is reported, the run goes on
                res.status, res.detail = "error", f"{type(e).__name__}: {e}"[:200]
            results.append(res)
    return results


# --------------------------------------------------------------------------------- nf4_dequantize cases


def run_nf4_dequantize(k, d, dtype, device, bench, with_bnb) -> list[Result]:
    w = (torch.randn(d, k, device=device) * 0.02).to(dtype)
    packed, state = nf4.quantize(w, 64)
    n = w.numel()
    nbytes = n // 2 + state.absmax.numel() + n * w.element_size()  # read codes + scales, write output
    expected = reference.nf4_dequantize(packed, state).to(device=device, dtype=torch.float32)
    providers = {"lora_fused": lambda: nf4.dequantize(packed, state)}
    if with_bnb:
        import bitsandbytes.functional as bnbF

        p2, s2 = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        providers["bitsandbytes"] = lambda: bnbF.dequantize_4bit(p2, s2)
    results = []
    for name, fn in providers.items():
        res = Result("nf4_dequantize", "fwd", name, 0, k, d, 0, _dtype_name(dtype))
        try:
            err = _rel(fn(), expected)
            res.rel_err = err
            if not err <= 2e-2:
                res.status, res.detail = "WRONG", f"relative error {err:.2e}"
            else:
                res.ms = bench(fn)
                res.tbps = nbytes / res.ms / 1e9
        except Exception as e:
            res.status, res.detail = "error", f"{type(e).__name__}: {e}"[:200]
        results.append(res)
    return results


# ----------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lora-fused-bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small grid, under a minute")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {OPS}")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {MODES}")
    ap.add_argument("--shapes", default=None, help="comma-separated k:d, e.g. 4096:4096,4096:11008")
    ap.add_argument("--M", default=None, help="comma-separated token counts")
    ap.add_argument("--r", default=None, help="comma-separated LoRA ranks")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--json", default=None, help="write every figure to this JSON file")
    ap.add_argument("--plot", default=None, help="write a PNG of speedup against M")
    ap.add_argument("--markdown", default=None, help="write a Markdown summary (lora_fused's times, ratios) to share")
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT baseline")
    ap.add_argument("--no-bnb", action="store_true", help="skip the bitsandbytes baseline")
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                    help="time nothing: merge the JSON files of runs split by --ops/--shapes (one GPU, one "
                         "build) into one table, and --json/--plot/--markdown of the whole")
    args = ap.parse_args(argv)
    if args.merge:
        return merge_runs(args.merge, args.json, args.plot, args.markdown)

    device = args.device or ("cuda" if lora_fused.cuda_available() else "cpu")
    if device == "cuda" and not lora_fused.cuda_available():
        ap.error("--device cuda: no CUDA device, or lora_fused was built without CUDA")
    dtype = DTYPES[args.dtype]
    if device == "cpu":
        print("NOTE: no GPU here (or a CPU-only build): timing the CPU implementations on small shapes. "
              "These figures say nothing about GPU speed.")
        shapes, ms_, rs = SHAPES_CPU, M_CPU, R_CPU
    elif args.quick:
        shapes, ms_, rs = SHAPES_QUICK, M_QUICK, R_QUICK
    else:
        shapes, ms_, rs = SHAPES_FULL, M_FULL, R_FULL
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
    if args.M:
        ms_ = [int(v) for v in args.M.split(",")]
    if args.r:
        rs = [int(v) for v in args.r.split(",")]
    ops = [o for o in args.ops.split(",") if o]
    modes = [m for m in args.modes.split(",") if m]
    for o in ops:
        if o not in OPS:
            ap.error(f"unknown op {o!r}; available: {OPS}")
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; available: {MODES}")
    with_peft = not args.no_peft and _importable("peft")
    with_bnb = not args.no_bnb and _importable("bitsandbytes")

    bench = _timer(device)
    graph_bench = _graph_timer(device, bench)
    torch.manual_seed(0)
    ceilings = measure_ceilings(device, bench)
    meta = _environment(device)
    print(f"lora_fused {lora_fused.__version__} on {meta['device_name']}, torch {torch.__version__}, {args.dtype}; "
          f"baselines: torch eager, cuBLAS base GEMM{', PEFT ' + meta['peft'] if with_peft else ''}"
          f"{', bitsandbytes ' + meta['bitsandbytes'] if with_bnb else ''}", flush=True)

    results: list[Result] = []
    cases = [("lora_linear", k, d, M, r) for (k, d) in shapes for r in rs for M in ms_] if "lora_linear" in ops else []
    cases += [("nf4_linear", k, d, M, 0) for (k, d) in shapes for M in ms_] if "nf4_linear" in ops else []
    cases += [("qlora_linear", k, d, M, r) for (k, d) in shapes for r in rs for M in ms_] if "qlora_linear" in ops else []
    cases += [("nf4_dequantize", k, d, 0, 0) for (k, d) in shapes] if "nf4_dequantize" in ops else []
    t0 = time.time()
    for i, (op, k, d, M, r) in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {op} {k}->{d} M={M} r={r} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
        if op in LAYER_OPS:
            results += run_layer(op, M, k, d, r, dtype, device, modes, bench, graph_bench, with_peft, with_bnb)
        else:
            results += run_nf4_dequantize(k, d, dtype, device, bench, with_bnb)
        if device == "cuda":
            torch.cuda.empty_cache()
    add_speedups(results)
    print(format_table(results, ceilings))
    wrong = [r for r in results if r.status == "WRONG"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "ceilings": ceilings, "args": vars(args), "results": [asdict(r) for r in results]}, f, indent=1)
        print(f"JSON written to {args.json}")
    if args.plot:
        print(write_plot(results, args.plot))
    if args.markdown:
        print(write_markdown(results, ceilings, meta, args.markdown))
    if wrong:
        print(f"{len(wrong)} case(s) gave WRONG results (see the table)")
    return 1 if wrong else 0


def merge_runs(paths: list[str], json_out: Optional[str], plot_out: Optional[str], markdown_out: Optional[str] = None) -> int:
    """One table (and JSON, plot) from several runs' JSON files. They must come from one GPU model,
    one torch and one lora_fused commit: a full grid split over several device calls."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    same = ("device_name", "torch", "commit")
    for path, run in zip(paths[1:], runs[1:]):
        for key in same:
            if run["meta"].get(key) != runs[0]["meta"].get(key):
                raise SystemExit(f"--merge: {path} has {key} {run['meta'].get(key)!r}, {paths[0]} has "
                                 f"{runs[0]['meta'].get(key)!r}; only runs of one GPU, torch and commit merge")
    results = [Result(**r) for run in runs for r in run["results"]]
    meta = dict(runs[0]["meta"], merged_from=list(paths))
    print(f"merged {len(results)} figures from {len(paths)} runs on {meta['device_name']}")
    print(format_table(results, runs[0]["ceilings"]))
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"meta": meta, "ceilings": runs[0]["ceilings"], "args": [run["args"] for run in runs],
                       "results": [asdict(r) for r in results]}, f, indent=1)
        print(f"JSON written to {json_out}")
    if plot_out:
        print(write_plot(results, plot_out))
    if markdown_out:
        print(write_markdown(results, runs[0]["ceilings"], meta, markdown_out))
    wrong = [r for r in results if r.status == "WRONG"]
    return 1 if wrong else 0


def _environment(device: str) -> dict:
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "CPU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lora_fused": lora_fused.__version__,
        "build": lora_fused.build_info(),
        "commit": _git_commit(),
    }
    for mod in ("peft", "bitsandbytes", "triton"):
        meta[mod] = _version_of(mod)
    return meta


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or os.environ.get("LORA_FUSED_COMMIT", "unknown")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("LORA_FUSED_COMMIT", "unknown")


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except Exception:
        return False


def _version_of(name: str) -> str:
    try:
        return getattr(__import__(name), "__version__", "?")
    except Exception:
        return ""


class _no_tf32:
    def __enter__(self):
        self.prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.prev


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a32 = a.detach().float()
    return ((a32 - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


if __name__ == "__main__":
    sys.exit(main())
