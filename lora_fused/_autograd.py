"""Backward formulas of the compiled ops, registered with torch.library.register_autograd.

lora_shrink:  u = s * x @ A^T     ->  dx = s * du @ A,            dA = s * du^T @ x
lora_expand:  out = y + s * u @ B^T -> dy = dout, du = s * dout @ B,  dB = s * dout^T @ u
"""

from __future__ import annotations

import torch

from . import _ops


def _shrink_setup(ctx, inputs, output):
    x, lora_A, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, lora_A if ctx.needs_input_grad[0] else None)


def _shrink_backward(ctx, du):
    x, lora_A = ctx.saved_tensors
    dx = torch.mm(du, lora_A).mul_(ctx.scale) if ctx.needs_input_grad[0] else None
    dA = torch.mm(du.t(), x).mul_(ctx.scale) if ctx.needs_input_grad[1] else None
    return dx, dA, None


def _expand_setup(ctx, inputs, output):
    y, u, lora_B, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(u if ctx.needs_input_grad[2] else None, lora_B if ctx.needs_input_grad[1] else None)


def _expand_backward(ctx, dout):
    u, lora_B = ctx.saved_tensors
    dy = dout if ctx.needs_input_grad[0] else None
    # du = s * dout @ B is a shrink with B^T [r, d] as the "A" operand (the kernel takes any strides).
    du = _ops.lora_shrink(dout.contiguous(), lora_B.t(), ctx.scale) if ctx.needs_input_grad[1] else None
    dB = torch.mm(dout.t(), u).mul_(ctx.scale) if ctx.needs_input_grad[2] else None
    return dy, du, dB, None


torch.library.register_autograd("lora_fused::lora_shrink", _shrink_backward, setup_context=_shrink_setup)
torch.library.register_autograd("lora_fused::lora_expand", _expand_backward, setup_context=_expand_setup)
