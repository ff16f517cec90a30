"""A catalogue of malformed inputs across the public API: each gives a clear Python exception (type
and a message naming what was wrong) or a documented result, never a crash, and the next valid call
still works."""

import pytest
import torch

import lora_fused
from lora_fused import _ops, nf4
from conftest import DEVICES, requires_cuda


def _layer(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return {"x": mk(4, 64), "w": mk(32, 64), "a": mk(8, 64), "b": mk(32, 8), "bias": mk(32)}


def _nf4(device):
    w = torch.randn(16, 64).to(device)
    packed, state = nf4.quantize(w, 64)
    return w, packed, state


def _deq(packed, state, **over):
    args = dict(packed=packed, absmax=state.absmax, nested_absmax=state.state2.absmax, nested_code=state.state2.code,
                offset=state.offset, blocksize=64, nested_blocksize=256, shape=[16, 64], dtype=torch.float32)
    args.update(over)
    return _ops.nf4_dequantize(**args)


# (id, function of device, expected exception, message pattern)
CASES = [
    ("linear: x not a tensor", lambda dv: lora_fused.lora_linear([1.0], **_kw(dv, exclude="x")), TypeError, "must be a tensor"),
    ("linear: weight 3-D", lambda dv: lora_fused.lora_linear(**_kw(dv, w=_layer(dv)["w"][None])), ValueError, "expected x"),
    ("linear: k disagrees", lambda dv: lora_fused.lora_linear(**_kw(dv, x=_layer(dv)["x"][:, :63])), ValueError, "expected x"),
    ("linear: lora_B shape", lambda dv: lora_fused.lora_linear(**_kw(dv, b=_layer(dv)["b"][:, :7])), ValueError, "lora_B"),
    ("linear: r = 0", lambda dv: lora_fused.lora_linear(**_kw(dv, a=_layer(dv)["a"][:0], b=_layer(dv)["b"][:, :0])), ValueError, "r >= 1"),
    ("linear: bias shape", lambda dv: lora_fused.lora_linear(**_kw(dv), bias=_layer(dv)["bias"][:31]), ValueError, "bias must have shape"),
    ("linear: dropout -0.1", lambda dv: lora_fused.lora_linear(**_kw(dv), dropout_p=-0.1), ValueError, "dropout_p"),
    ("linear: dropout 1.0", lambda dv: lora_fused.lora_linear(**_kw(dv), dropout_p=1.0), ValueError, "dropout_p"),
    ("linear: x fp64, weight fp32", lambda dv: lora_fused.lora_linear(**_kw(dv, x=_layer(dv)["x"].double())), TypeError, "same dtype"),
    ("linear: integer tensors", lambda dv: lora_fused.lora_linear(**{k: v.to(torch.int32) if torch.is_tensor(v) else v for k, v in _kw(dv).items()}), TypeError, "bfloat16, float16, float32 or float64"),
    ("module: r = 0", lambda dv: lora_fused.LoraLinear(8, 4, r=0), ValueError, "r must be at least 1"),
    ("module: dropout 1.5", lambda dv: lora_fused.LoraLinear(8, 4, lora_dropout=1.5), ValueError, "lora_dropout"),
    ("module: unknown init", lambda dv: lora_fused.LoraLinear(8, 4, init_lora_weights="xavier"), ValueError, "init_lora_weights"),
    ("shrink: 1-D x", lambda dv: _ops.lora_shrink(_layer(dv)["x"][0], _layer(dv)["a"]), ValueError, "must have 2 dimensions"),
    ("shrink: dtype mismatch", lambda dv: _ops.lora_shrink(_layer(dv)["x"], _layer(dv)["a"].half()), TypeError, "same dtype"),
    ("shrink: k disagrees", lambda dv: _ops.lora_shrink(_layer(dv)["x"], _layer(dv)["a"][:, :63]), ValueError, "last dimensions must agree"),
    ("expand: shapes", lambda dv: _ops.lora_expand(_layer(dv)["x"], _layer(dv)["x"][:, :8], _layer(dv)["b"]), ValueError, r"expected y \[M, d\]"),
    ("expand: r = 0", lambda dv: _ops.lora_expand(_layer(dv)["x"][:, :32], _layer(dv)["x"][:, :0], _layer(dv)["b"][:, :0]), ValueError, "at least 1"),
    ("decode: bias shape", lambda dv: _ops.lora_decode(*[_layer(dv)[k] for k in "xwab"], 1.0, _layer(dv)["bias"][:5]), ValueError, "bias must have shape"),
    ("decode: weight k", lambda dv: _ops.lora_decode(_layer(dv)["x"], _layer(dv)["w"][:, :60], _layer(dv)["a"], _layer(dv)["b"], 1.0), ValueError, "expected x"),
    ("nf4: not a tensor", lambda dv: nf4.quantize([[1.0]]), TypeError, "must be a tensor"),
    ("nf4: integer weight", lambda dv: nf4.quantize(torch.ones(4, 64, dtype=torch.int32, device=dv)), TypeError, "bfloat16, float16 or float32"),
    ("nf4: blocksize 48", lambda dv: nf4.quantize(torch.ones(4, 64, device=dv), 48), ValueError, "blocksize must be one of"),
    ("nf4: blocksize 8192", lambda dv: _ops.nf4_quantize(torch.ones(4, 64, device=dv), 8192), ValueError, "power of two"),
    ("nf4: NaN weight", lambda dv: nf4.quantize(torch.full((4, 64), float("nan"), device=dv)), ValueError, "NaN or Inf"),
    ("nf4: Inf weight", lambda dv: nf4.quantize(torch.full((4, 64), float("inf"), device=dv)), ValueError, "NaN or Inf"),
    ("nf4: empty weight", lambda dv: nf4.quantize(torch.empty(0, 64, device=dv)), ValueError, "empty"),
    ("nf4: state not a QuantState", lambda dv: nf4.dequantize(_nf4(dv)[1], {"absmax": 1}), TypeError, "QuantState"),
    ("nf4: packed int16", lambda dv: _deq(_nf4(dv)[1].to(torch.int16), _nf4(dv)[2]), TypeError, "uint8"),
    ("nf4: packed truncated", lambda dv: _deq(_nf4(dv)[1][:-1], _nf4(dv)[2]), ValueError, "packs into"),
    ("nf4: shape disagrees with state", lambda dv: _deq(_nf4(dv)[1], _nf4(dv)[2], shape=[16, 66]), ValueError, "packs into"),
    ("nf4: absmax short", lambda dv: _deq(_nf4(dv)[1], _nf4(dv)[2], absmax=_nf4(dv)[2].absmax[:-1]), ValueError, "need absmax of"),
    ("nf4: nested code short", lambda dv: _deq(_nf4(dv)[1], _nf4(dv)[2], nested_code=_nf4(dv)[2].state2.code[:255]), ValueError, "256 values"),
    ("nf4: from_dict missing keys", lambda dv: nf4.QuantState.from_dict({"absmax": torch.ones(2)}), ValueError, "missing"),
    ("nf4: from_dict fp4", lambda dv: nf4.QuantState.from_dict({"quant_state.bitsandbytes__fp4": torch.tensor([1], dtype=torch.uint8)}), ValueError, "only NF4"),
    ("nf4_linear: x last dim", lambda dv: lora_fused.nf4_linear(torch.ones(3, 63, device=dv), *_nf4(dv)[1:]), ValueError, r"x must be \[\.\.\., 64\]"),
    ("nf4_linear: x int32", lambda dv: lora_fused.nf4_linear(torch.ones(3, 64, dtype=torch.int32, device=dv), *_nf4(dv)[1:]), TypeError, "bfloat16, float16 or float32"),
    ("nf4_linear: state is a dict", lambda dv: lora_fused.nf4_linear(torch.ones(3, 64, device=dv), _nf4(dv)[1], {}), TypeError, "QuantState"),
    ("nf4_linear: packed float", lambda dv: lora_fused.nf4_linear(torch.ones(3, 64, device=dv), _nf4(dv)[1].float(), _nf4(dv)[2]), TypeError, "uint8"),
    ("nf4_linear: bias shape", lambda dv: lora_fused.nf4_linear(torch.ones(3, 64, device=dv), *_nf4(dv)[1:], torch.ones(15, device=dv)), ValueError, "bias must have shape"),
    ("qlora_linear: r = 0", lambda dv: lora_fused.qlora_linear(torch.ones(3, 64, device=dv), *_nf4(dv)[1:], torch.ones(0, 64, device=dv), torch.ones(16, 0, device=dv), 1.0), ValueError, "r >= 1"),
    ("qlora_linear: lora_B rows", lambda dv: lora_fused.qlora_linear(torch.ones(3, 64, device=dv), *_nf4(dv)[1:], torch.ones(4, 64, device=dv), torch.ones(15, 4, device=dv), 1.0), ValueError, r"lora_B \[16, r\]"),
    ("qlora_linear: dropout 1.0", lambda dv: lora_fused.qlora_linear(torch.ones(3, 64, device=dv), *_nf4(dv)[1:], torch.ones(4, 64, device=dv), torch.ones(16, 4, device=dv), 1.0, dropout_p=1.0), ValueError, "dropout_p"),
    ("NF4Linear: blocksize 48", lambda dv: lora_fused.NF4Linear(64, 16, blocksize=48, device=dv), ValueError, "blocksize must be one of"),
    ("NF4Linear: compute int8", lambda dv: lora_fused.NF4Linear(64, 16, compute_dtype=torch.int8, device=dv), TypeError, "compute_dtype"),
    ("QLoraLinear: r = 0", lambda dv: lora_fused.QLoraLinear(64, 16, r=0, device=dv), ValueError, "r must be at least 1"),
    ("QLoraLinear.from_bnb: plain Linear", lambda dv: lora_fused.QLoraLinear.from_bnb(torch.nn.Linear(4, 4)), ValueError, "Linear4bit"),
    ("NF4Linear: state of another shape", lambda dv: _load_other_shape(dv), RuntimeError, "state is for a weight of shape"),
    ("blockwise: code of 255", lambda dv: _ops.blockwise_quantize(torch.ones(300, device=dv), torch.ones(255, device=dv), 256), TypeError, "256 sorted values"),
]


def _load_other_shape(device):
    layer = lora_fused.NF4Linear(64, 16, compute_dtype=torch.float32, device=device)
    layer.load_state_dict(lora_fused.NF4Linear(64, 32, compute_dtype=torch.float32, device=device).state_dict())


def _kw(device, exclude=None, **override):
    t = _layer(device)
    kw = {"x": t["x"], "weight": t["w"], "lora_A": t["a"], "lora_B": t["b"], "scaling": 2.0}
    rename = {"w": "weight", "a": "lora_A", "b": "lora_B"}
    for k, v in override.items():
        kw[rename.get(k, k)] = v
    if exclude:
        kw.pop(exclude)
    return kw


def _valid_call_works(device):
    t = _layer(device)
    y = lora_fused.lora_linear(t["x"], t["w"], t["a"], t["b"], 2.0, t["bias"])
    packed, state = nf4.quantize(t["w"], 64)
    assert torch.isfinite(y).all() and torch.isfinite(nf4.dequantize(packed, state)).all()


def test_catalogue_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,fn,exc,match", CASES, ids=[c[0] for c in CASES])
def test_malformed_input(device, name, fn, exc, match):
    with pytest.raises(exc, match=match):
        fn(device)
    _valid_call_works(device)


@pytest.mark.parametrize("device", DEVICES)
def test_documented_results(device):
    t = _layer(device)
    # No tokens: an empty result of the right shape.
    y = lora_fused.lora_linear(t["x"][:0], t["w"], t["a"], t["b"], 2.0)
    assert y.shape == (0, 32)
    # NaN in the input propagates to the rows it touches, and only those.
    x = t["x"].clone()
    x[1, 5] = float("nan")
    y = lora_fused.lora_linear(x, t["w"], t["a"], t["b"], 2.0)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()
    # The same for the NF4 matmul, on both CUDA paths (4 rows: decode kernel; 40: slabs).
    _, packed, state = _nf4(device)
    for m in (4, 40):
        x = torch.randn(m, 64, device=device, dtype=torch.bfloat16)  # bf16: the decode kernel takes M <= 16
        assert lora_fused.nf4_linear(x[:0], packed, state).shape == (0, 16)
        x[1, 5] = float("nan")
        y = lora_fused.nf4_linear(x, packed, state)
        assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()
    _valid_call_works(device)


@requires_cuda
@pytest.mark.cuda
def test_tensors_on_different_devices():
    t = _layer("cuda")
    with pytest.raises(RuntimeError, match="one device"):
        lora_fused.lora_linear(t["x"], t["w"], t["a"].cpu(), t["b"], 2.0)
    with pytest.raises(RuntimeError, match="same device"):
        _ops.lora_shrink(t["x"], t["a"].cpu())
    with pytest.raises(RuntimeError, match="same device"):
        _ops.nf4_dequantize(*_nf4("cuda")[1:2], _nf4("cpu")[2].absmax, _nf4("cpu")[2].state2.absmax,
                            _nf4("cpu")[2].state2.code, 0.0, 64, 256, [16, 64], torch.float32)
    _valid_call_works("cuda")
