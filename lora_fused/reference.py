"""Plain-PyTorch references, used by the tests and the benchmarks' correctness checks.

Each computes in float64 (unless told otherwise) what the corresponding op computes, written as
directly from the definition as possible.
"""

from __future__ import annotations

from typing import Optional

import torch

from .nf4 import NF4_LEVELS, QuantState


def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return scale * (x.double() @ lora_A.double().t())


def lora_expand(y: torch.Tensor, u: torch.Tensor, lora_B: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return y.double() + scale * (u.double() @ lora_B.double().t())


def lora_adapter_grads(
    grad_out: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(du, dA, dB) of y = scale * (x A^T) B^T for the upstream gradient grad_out, in float64."""
    dy, xd, a, b = grad_out.double(), x.double(), lora_A.double(), lora_B.double()
    du = scale * (dy @ b)
    return du, du.t() @ xd, dy.t() @ (scale * (xd @ a.t()))


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
    lora_input: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x @ W^T + bias + scaling * (lora_input @ A^T) @ B^T in float64; lora_input (the dropped-out
    x) defaults to x."""
    xd = x.double()
    xl = xd if lora_input is None else lora_input.double()
    y = xd @ weight.double().t() + scaling * ((xl @ lora_A.double().t()) @ lora_B.double().t())
    return y if bias is None else y + bias.double()


def nf4_quantize(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The NF4 format from its definition: fp32 scale by 1/absmax (reciprocal guarded at 1e-38),
    the nibble is the count of fp32 midpoints strictly below, odd tails pad with level 7."""
    flat = w.detach().reshape(-1).float().cpu()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = 1.0 / absmax.clamp(min=1e-38)
    scaled = (blocks * inv[:, None]).reshape(-1)[:n]
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    mids = (levels[:-1] + levels[1:]) / 2
    q = (scaled[:, None] > mids[None, :]).sum(dim=1).to(torch.uint8)
    if n % 2:
        q = torch.cat([q, torch.tensor([7], dtype=torch.uint8)])
    return ((q[0::2] << 4) | q[1::2]).view(-1, 1), absmax


def nf4_block_scales(state: QuantState) -> torch.Tensor:
    """absmax per block as fp32, decoding double quantization: fp32(fp32(code2[q] * absmax2) + offset)."""
    if state.state2 is None:
        return state.absmax.float().cpu()
    s2 = state.state2
    idx = torch.arange(state.absmax.numel()) // s2.blocksize
    prod = s2.code.cpu()[state.absmax.cpu().long()] * s2.absmax.cpu()[idx]
    return prod + torch.tensor(state.offset, dtype=torch.float32)


def nf4_dequantize(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """The decoded weight in float64: level[nibble] * block scale."""
    bytes_ = packed.reshape(-1).cpu().long()
    nib = torch.stack([bytes_ >> 4, bytes_ & 15], dim=1).reshape(-1)
    n = 1
    for s in state.shape:
        n *= int(s)
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)[nib[:n]]
    scales = nf4_block_scales(state).double()[torch.arange(n) // state.blocksize]
    return (levels * scales).reshape(state.shape)


def nf4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    bias: Optional[torch.Tensor] = None,
    lora_A: Optional[torch.Tensor] = None,
    lora_B: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    lora_input: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x @ W^T (+ bias) (+ scaling * (lora_input @ A^T) @ B^T) in float64 with W the exact decoded
    NF4 weight (level * block scale); on x's device."""
    w = nf4_dequantize(packed, state).to(x.device)
    y = x.double() @ w.t()
    if bias is not None:
        y = y + bias.double()
    if lora_A is not None:
        xl = x.double() if lora_input is None else lora_input.double()
        y = y + scaling * ((xl @ lora_A.double().t()) @ lora_B.double().t())
    return y
