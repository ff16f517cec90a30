"""The NF4 format with double quantization (QLoRA), byte-compatible with bitsandbytes.

Layout: the weight [N, K] is flattened row-major and cut into blocks of `blocksize` elements (a
block may span rows); each block keeps its absmax, each element the 4-bit index of the nearest NF4
level to value/absmax (ties to the lower level); byte j holds element 2j in the high nibble.
Double quantization stores absmax - mean(absmax) as 8-bit codes of bitsandbytes' signed dynamic
map in blocks of 256, with one fp32 scale per block and the mean as `offset`.

`QuantState.as_dict(packed=True)` / `QuantState.from_dict()` give and take the state-dict entries
that bitsandbytes' `Linear4bit` writes under `weight.` (absmax, quant_map, nested_absmax,
nested_quant_map, quant_state.bitsandbytes__nf4).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from . import _ops

NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
QS_KEY = "quant_state.bitsandbytes__nf4"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def nf4_code(device: Optional[torch.device | str] = None) -> torch.Tensor:
    """The 16 NF4 levels as fp32 (bitsandbytes' `weight.quant_map`)."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def dynamic_map(device: Optional[torch.device | str] = None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`): for i = 0..6 the
    midpoints of linspace(0.1, 1, 2**i + 1) scaled by 10**(i-6), both signs, plus 0 and 1, sorted;
    computed with the same fp32 operations so the 256 values match bit for bit."""
    values: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (i - 6)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


@dataclass
class NestedState:
    """The double-quantization constants: one fp32 scale per `blocksize` absmax codes, and the code."""

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int = NESTED_BLOCKSIZE
    dtype: torch.dtype = torch.float32


@dataclass
class QuantState:
    """What it takes to decode an NF4 weight (the fields of bitsandbytes' QuantState).

    absmax: fp32 [blocks], or uint8 codes [blocks] when double-quantized (state2 is then set and
    absmax_i = state2.code[absmax[i]] * state2.absmax[i // 256] + offset, in fp32).
    """

    absmax: torch.Tensor
    shape: torch.Size
    code: torch.Tensor
    blocksize: int
    dtype: torch.dtype
    quant_type: str = "nf4"
    offset: Optional[float] = None
    state2: Optional[NestedState] = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def to(self, device) -> "QuantState":
        s2 = self.state2
        if s2 is not None:
            s2 = replace(s2, absmax=s2.absmax.to(device), code=s2.code.to(device))
        return replace(self, absmax=self.absmax.to(device), code=self.code.to(device), state2=s2)

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The entries bitsandbytes writes (without the `weight.` prefix), in its order; with
        packed=True the non-tensor items are one uint8 tensor of UTF-8 JSON."""
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape),
        }
        if self.state2 is not None:
            d.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": _dtype_name(self.state2.dtype),
                    "nested_offset": float(self.offset),
                }
            )
        if not packed:
            return d
        out = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        meta = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        out[QS_KEY] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], device=None) -> "QuantState":
        """Build a QuantState from `as_dict()` output or from a bitsandbytes state dict's
        `weight.*` entries (any key prefix is ignored)."""
        items: dict[str, Any] = {}
        for k, v in d.items():
            if k.endswith(QS_KEY):
                items.update(json.loads(bytes(v.cpu().tolist()).decode("utf-8")))
            elif "bitsandbytes__" in k:
                raise ValueError(f"lora_fused.nf4: only NF4 quantization is supported; got state entry {k!r}")
            else:
                items[k.rsplit(".", 1)[-1]] = v
        missing = [k for k in ("absmax", "quant_map", "quant_type", "blocksize", "dtype", "shape") if k not in items]
        if missing:
            raise ValueError(f"lora_fused.nf4: the NF4 state is missing {missing}; got keys {sorted(d)}")
        if items["quant_type"] != "nf4":
            raise ValueError(f"lora_fused.nf4: only quant_type 'nf4' is supported; got {items['quant_type']!r}")
        code = items["quant_map"].to(device=device, dtype=torch.float32)
        if not torch.equal(code.cpu(), nf4_code()):
            raise ValueError("lora_fused.nf4: quant_map is not the NF4 code table; this state is not NF4")
        state2, offset = None, None
        if "nested_absmax" in items:
            state2 = NestedState(
                absmax=items["nested_absmax"].to(device),
                code=items["nested_quant_map"].to(device),
                blocksize=int(items["nested_blocksize"]),
                dtype=_DTYPES[items["nested_dtype"]],
            )
            offset = float(items["nested_offset"])
        state = cls(
            absmax=items["absmax"].to(device),
            shape=torch.Size(items["shape"]),
            code=code,
            blocksize=int(items["blocksize"]),
            dtype=_DTYPES[items["dtype"]],
            quant_type="nf4",
            offset=offset,
            state2=state2,
        )
        state.validate()
        return state

    def validate(self) -> None:
        """Raise ValueError if the state cannot describe an NF4 weight of `shape`."""
        n = 1
        for s in self.shape:
            n *= int(s)
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"lora_fused.nf4: blocksize must be one of {BLOCKSIZES}; got {self.blocksize}")
        blocks = -(-n // self.blocksize)
        if self.absmax.dim() != 1 or self.absmax.numel() != blocks:
            raise ValueError(
                f"lora_fused.nf4: a weight of shape {tuple(self.shape)} in blocks of {self.blocksize} has {blocks} "
                f"blocks, but absmax has shape {tuple(self.absmax.shape)}"
            )
        if self.nested != (self.absmax.dtype == torch.uint8):
            raise ValueError(
                "lora_fused.nf4: double-quantized states have uint8 absmax and state2; got absmax "
                f"{self.absmax.dtype} with state2 {'set' if self.nested else 'missing'}"
            )


def quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> tuple[torch.Tensor, QuantState]:
    """Quantize w (fp32/fp16/bf16, any shape, CPU or CUDA) to NF4. Returns (packed, state), with
    packed uint8 [(numel+1)//2, 1] exactly as bitsandbytes.functional.quantize_4bit(w, blocksize,
    compress_statistics=double_quant, quant_type="nf4") lays it out."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"lora_fused.nf4.quantize: w must be a tensor; got {type(w).__name__}")
    if w.numel() == 0:
        raise ValueError(f"lora_fused.nf4.quantize: w is empty (shape {tuple(w.shape)}); there is nothing to quantize")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"lora_fused.nf4.quantize: blocksize must be one of {BLOCKSIZES}; got {blocksize}")
    if w.dtype in _DTYPES.values() and not bool(torch.isfinite(w).all()):
        raise ValueError("lora_fused.nf4.quantize: w holds NaN or Inf; NF4 can only represent finite weights")
    packed, absmax = _ops.nf4_quantize(w, blocksize)
    state = QuantState(absmax=absmax, shape=w.shape, code=nf4_code(w.device), blocksize=blocksize, dtype=w.dtype)
    if double_quant:
        offset = absmax.mean()
        code2 = dynamic_map(w.device)
        codes, absmax2 = _ops.blockwise_quantize(absmax - offset, code2, NESTED_BLOCKSIZE)
        state.absmax = codes
        state.offset = offset.item()
        state.state2 = NestedState(absmax=absmax2, code=code2)
    return packed, state


def dequantize(packed: torch.Tensor, state: QuantState, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Decode an NF4 weight to `dtype` (default: the dtype it was quantized from), shape `state.shape`."""
    if not isinstance(state, QuantState):
        raise TypeError(f"lora_fused.nf4.dequantize: state must be a lora_fused.nf4.QuantState; got {type(state)}")
    s2 = state.state2
    return _ops.nf4_dequantize(
        packed,
        state.absmax,
        s2.absmax if s2 is not None else None,
        s2.code if s2 is not None else None,
        state.offset if state.offset is not None else 0.0,
        state.blocksize,
        s2.blocksize if s2 is not None else NESTED_BLOCKSIZE,
        list(state.shape),
        dtype or state.dtype,
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
