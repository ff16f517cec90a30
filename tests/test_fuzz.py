"""Randomized tests: every op against its reference on drawn cases (sizes of 1, primes, tile
boundaries +-1; strided and transposed inputs; every dtype; ranks; blocksizes; double quantization,
bias and dropout on/off; for the NF4 matmuls both CUDA paths, decode kernel and slabs; for
gemm_concat_k both CUDA paths, cuBLAS and the Hopper kernel).

LORA_FUSED_FUZZ_CASES sets the number of cases per op and device (default 40: the CI slice;
`scripts/gpu_check.sh --full` runs 1000). LORA_FUSED_FUZZ_SEED picks the stream. A failure prints one
line per failing case that reproduces it:

    python -c "import sys; sys.path.insert(0, 'tests'); from test_fuzz import run_case; run_case(...)"
"""

import contextlib
import os
import random

import pytest
import torch

import lora_fused
from lora_fused import _ops, nf4, reference
from conftest import DEVICES, assert_error_rule

N_CASES = int(os.environ.get("LORA_FUSED_FUZZ_CASES", "40"))
SEED = int(os.environ.get("LORA_FUSED_FUZZ_SEED", "1234"))
SIZES = [1, 2, 3, 5, 7, 8, 13, 15, 16, 17, 31, 32, 33, 63, 64, 65, 97, 127, 128, 129, 255, 256, 257, 509, 1021, 1024, 1025]
RANKS = [1, 2, 7, 8, 16, 33, 64, 128, 256]
ALIGNED = [8, 16, 24, 64, 72, 128, 136, 256, 264, 512, 520, 1032]  # 16-byte rows: the Hopper GEMM takes them
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


@contextlib.contextmanager
def _gemm_path(path: str):
    """LORA_FUSED_GEMM_CONCAT_K for one case: "sm90" asks for the Hopper kernel where it can run."""
    old = os.environ.pop("LORA_FUSED_GEMM_CONCAT_K", None)
    if path == "sm90":
        os.environ["LORA_FUSED_GEMM_CONCAT_K"] = "sm90"
    try:
        yield
    finally:
        os.environ.pop("LORA_FUSED_GEMM_CONCAT_K", None)
        if old is not None:
            os.environ["LORA_FUSED_GEMM_CONCAT_K"] = old


def _draw(op: str, rng: random.Random) -> dict:
    case = {"dtype": rng.choice(["bf16", "fp16", "fp32"]), "seed": rng.randrange(2**31)}
    if op in ("lora_shrink", "lora_expand", "lora_decode", "lora_linear"):
        case.update(M=rng.choice(SIZES), k=rng.choice(SIZES), d=rng.choice(SIZES), r=rng.choice(RANKS),
                    strided=rng.random() < 0.3, scale=rng.choice([0.5, 1.0, 2.0, 16.0]), bias=rng.random() < 0.5)
        if op == "lora_linear":
            case["dropout"] = rng.choice([0.0, 0.0, 0.1, 0.3])
        if op == "lora_decode":
            case["M"] = rng.choice([1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 33])
            case["k"] = rng.choice([8, 16, 24, 64, 256, 264, 512, 520, 1024, 1032, 2048, 4096, 4104, 100, 33])
    elif op == "gemm_concat_k":
        pick = lambda: rng.choice(ALIGNED) if rng.random() < 0.6 else rng.choice(SIZES)  # noqa: E731
        case.update(M=rng.choice(SIZES + [2049, 4097]), n=pick(), k1=pick(), k2=rng.choice(ALIGNED[:6] + RANKS),
                    b_n_major=rng.random() < 0.5, strided=rng.random() < 0.3, bias=rng.random() < 0.5,
                    path=rng.choice(["default", "sm90"]))
    elif op == "lora_dropout":
        case.update(M=rng.choice(SIZES), k=rng.choice(SIZES), p=rng.choice([0.01, 0.1, 0.3, 0.5, 0.9]),
                    strided=rng.random() < 0.3, dropout_seed=rng.randrange(2**62))
        if rng.random() < 0.25:
            case["dtype"] = "fp64"
    elif op in ("nf4_linear", "qlora_linear"):
        # M <= 16 with K % 32 == 0 takes the CUDA decode kernel, the rest the slab path: draw both
        case.update(M=rng.choice(SIZES + [4, 9, 12]), k=rng.choice(SIZES + [96, 160, 480, 544, 2048, 4128]),
                    d=rng.choice(SIZES), blocksize=rng.choice(nf4.BLOCKSIZES), double_quant=rng.random() < 0.7,
                    strided=rng.random() < 0.3, bias=rng.random() < 0.5, r=rng.choice(RANKS),
                    scale=rng.choice([0.5, 1.0, 2.0, 16.0]))
    else:  # nf4
        case.update(rows=rng.choice(SIZES), cols=rng.choice(SIZES), blocksize=rng.choice(nf4.BLOCKSIZES),
                    double_quant=rng.random() < 0.7)
        if case["dtype"] == "fp32" and rng.random() < 0.5:
            case["dtype"] = "bf16"
    return case


def _rand(shape, dtype, device, g, scale=1.0, strided=False):
    if strided and len(shape) == 2:  # a column slice (row stride > width) of a wider tensor
        t = torch.randn(shape[0], shape[1] + 5, generator=g)[:, 3 : 3 + shape[1]]
    else:
        t = torch.randn(*shape, generator=g)
    return (t * scale).to(device=device, dtype=dtype)


def run_case(op: str, case: dict, device: str) -> None:
    """Check one case; raises AssertionError with the numbers on a mismatch."""
    g = torch.Generator().manual_seed(case["seed"])
    dt = DTYPES[case["dtype"]]
    if op in ("lora_shrink", "lora_expand", "lora_decode", "lora_linear"):
        M, k, d, r, s = case["M"], case["k"], case["d"], case["r"], case["scale"]
        x = _rand((M, k), dt, device, g, strided=case["strided"])
        w = _rand((d, k), dt, device, g, k**-0.5)
        a = _rand((r, k), dt, device, g, k**-0.5)
        b = _rand((d, r), dt, device, g, r**-0.5)
        bias = _rand((d,), dt, device, g) if case["bias"] else None
        if op == "lora_shrink":
            assert_error_rule(_ops.lora_shrink(x, a, s), reference.lora_shrink(x, a, s), s * (x @ a.t()), op)
        elif op == "lora_expand":
            y = _rand((M, d), dt, device, g, strided=case["strided"])
            u = _rand((M, r), dt, device, g)
            assert_error_rule(_ops.lora_expand(y, u, b, s), reference.lora_expand(y, u, b, s), y + s * (u @ b.t()), op)
        elif op == "lora_decode":
            same = x @ w.t() + s * ((x @ a.t()) @ b.t()) + (bias if bias is not None else 0)
            assert_error_rule(_ops.lora_decode(x, w, a, b, s, bias), reference.lora_linear(x, w, a, b, s, bias), same, op)
        else:
            params = [x.requires_grad_(), a.requires_grad_(), b.requires_grad_()]
            p = case.get("dropout", 0.0)
            torch.manual_seed(case["seed"])
            y = lora_fused.lora_linear(x, w, a, b, s, bias, dropout_p=p)
            # The layer's mask, regenerated from the seed it drew (the same draw after the same seeding).
            torch.manual_seed(case["seed"])
            keep = _ops.lora_dropout(torch.ones(M, k, device=device), p, _ops.dropout_seed(x.device)) != 0 if p else None

            def layer(x_, a_, b_, bias_):
                xl = x_ * keep / (1 - p) if p else x_
                out = x_ @ w.to(x_.dtype).t() + s * ((xl @ a_.t()) @ b_.t())
                return out + bias_ if bias_ is not None else out

            same = layer(x, a, b, bias)
            p64 = [q.detach().double().requires_grad_() for q in params]
            bias64 = bias.double() if bias is not None else None
            ref = layer(*p64, bias64)
            assert_error_rule(y.detach(), ref.detach(), same.detach(), "forward")
            gy = _rand(tuple(y.shape), dt, device, g)
            refs = torch.autograd.grad(ref, p64, gy.double())
            for name, o, rf, t in zip(("dx", "dA", "dB"), torch.autograd.grad(y, params, gy), refs,
                                      torch.autograd.grad(same, params, gy)):
                assert_error_rule(o, rf, t, name)
    elif op in ("nf4_linear", "qlora_linear"):
        _run_nf4_linear_case(op, case, dt, device, g)
    elif op == "gemm_concat_k":
        M, n, k1, k2 = case["M"], case["n"], case["k1"], case["k2"]
        a = _rand((M, k1), dt, device, g, strided=case["strided"])
        a2 = _rand((M, k2), dt, device, g)
        if case["b_n_major"]:  # a transposed view, as W^T in the input gradient
            b, b2 = _rand((k1, n), dt, device, g, k1**-0.5).t(), _rand((k2, n), dt, device, g).t()
        else:
            b, b2 = _rand((n, k1), dt, device, g, k1**-0.5), _rand((n, k2), dt, device, g)
        bias = _rand((n,), dt, device, g) if case["bias"] else None
        with _gemm_path(case["path"]):
            out = _ops.gemm_concat_k(a, b, a2, b2, bias)
        ref = a.double() @ b.double().t() + a2.double() @ b2.double().t()
        same = a @ b.t() + a2 @ b2.t()
        if bias is not None:
            ref, same = ref + bias.double(), same + bias
        assert_error_rule(out, ref, same, op)
    elif op == "lora_dropout":
        M, k, p = case["M"], case["k"], case["p"]
        x = _rand((M, k), dt, device, g, strided=case["strided"])
        seed = torch.tensor([case["dropout_seed"]], dtype=torch.int64, device=device)
        out = _ops.lora_dropout(x, p, seed)
        assert torch.equal(out, _ops.lora_dropout(x, p, seed)), "the same seed gave another result"
        kept = out != 0
        acc = torch.float64 if dt == torch.float64 else torch.float32
        expected = (x.to(acc) * torch.tensor(1.0 / (1.0 - p), dtype=acc, device=device)).to(dt)
        assert torch.equal(out[kept], expected[kept]), "kept values are not x / (1 - p)"
        if device != "cpu":  # the same Philox stream and arithmetic: bit-identical
            assert torch.equal(_ops.lora_dropout(x.cpu(), p, seed.cpu()), out.cpu()), "CPU and GPU results differ"
        if M * k >= 4096:
            rate, sigma = 1.0 - kept.double().mean().item(), (p * (1 - p) / (M * k)) ** 0.5
            assert abs(rate - p) < 6 * sigma + 1e-3, f"drop rate {rate:.4f} for p = {p}"
    else:
        wt = _rand((case["rows"], case["cols"]), dt, device, g)
        packed, state = nf4.quantize(wt, case["blocksize"], double_quant=case["double_quant"])
        ref_packed, ref_absmax = reference.nf4_quantize(wt, case["blocksize"])
        assert torch.equal(packed.cpu(), ref_packed), "packed bytes differ from the format's definition"
        if not case["double_quant"]:
            assert torch.equal(state.absmax.cpu(), ref_absmax), "absmax differs"
        out = nf4.dequantize(packed, state)
        assert not torch.isnan(out).any(), "NaN in the dequantized weight"
        assert torch.equal(out.cpu(), reference.nf4_dequantize(packed, state).float().to(dt)), "dequantize differs"


def _run_nf4_linear_case(op: str, case: dict, dt: torch.dtype, device: str, g: torch.Generator) -> None:
    """nf4_linear / qlora_linear forward and every gradient against float64 with the exact decoded
    weight; PyTorch's yardstick is the same matmuls in dt over the decoded weight."""
    M, k, d, r, s = case["M"], case["k"], case["d"], case["r"], case["scale"]
    wt = _rand((d, k), dt, device, g, k**-0.5)
    packed, state = nf4.quantize(wt, case["blocksize"], double_quant=case["double_quant"])
    w = nf4.dequantize(packed, state, dt)
    x = _rand((M, k), dt, device, g, strided=case["strided"]).requires_grad_()
    bias = _rand((d,), dt, device, g).requires_grad_() if case["bias"] else None
    params = [x] + ([bias] if bias is not None else [])
    if op == "qlora_linear":
        a = _rand((r, k), dt, device, g, k**-0.5).requires_grad_()
        b = _rand((d, r), dt, device, g, r**-0.5).requires_grad_()
        params += [a, b]
        y = lora_fused.qlora_linear(x, packed, state, a, b, s, bias)
        same = x @ w.t() + s * ((x @ a.t()) @ b.t())
    else:
        y = lora_fused.nf4_linear(x, packed, state, bias)
        same = x @ w.t()
    same = same + bias if bias is not None else same
    p64 = [p.detach().double().requires_grad_() for p in params]
    b64 = p64[1] if bias is not None else None
    lora64 = {"lora_A": p64[-2], "lora_B": p64[-1], "scaling": s} if op == "qlora_linear" else {}
    ref = reference.nf4_linear(p64[0], packed, state, b64, **lora64)
    assert_error_rule(y.detach(), ref.detach(), same.detach(), f"{op} forward")
    gy = _rand(tuple(y.shape), dt, device, g)
    names = ["dx"] + (["dbias"] if bias is not None else []) + (["dA", "dB"] if op == "qlora_linear" else [])
    for name, o, rf, t in zip(names, torch.autograd.grad(y, params, gy), torch.autograd.grad(ref, p64, gy.double()),
                              torch.autograd.grad(same, params, gy)):
        assert_error_rule(o, rf, t, f"{op} {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "op", ["lora_shrink", "lora_expand", "lora_decode", "lora_linear", "nf4", "nf4_linear", "qlora_linear",
           "gemm_concat_k", "lora_dropout"],
)
def test_fuzz(op, device):
    rng = random.Random(f"{SEED}-{op}-{device}")
    failures = []
    for i in range(N_CASES):
        case = _draw(op, rng)
        try:
            run_case(op, case, device)
        except AssertionError as e:
            first = str(e).splitlines()[0] if str(e) else "assertion failed"
            failures.append(f"case {i}: {first} | reproduce: run_case({op!r}, {case!r}, {device!r})")
    assert not failures, f"{len(failures)} of {N_CASES} {op} cases failed on {device}:\n" + "\n".join(failures[:25])
