"""Backward formulas of the compiled ops, registered with torch.library.register_autograd.

lora_shrink:  u = s * x @ A^T     ->  dx = s * du @ A,            dA = s * du^T @ x
lora_expand:  out = y + s * u @ B^T -> dy = dout, du = s * dout @ B,  dB = s * dout^T @ u
nf4_linear:   out = x @ W^T + b + u @ B^T -> dx = dout @ W (nf4_linear_grad_input, W frozen),
              db = sum(dout), du = dout @ B, dB = dout^T @ u
              with lora_A in place of u (u = s x A^T made by the op): dx = dout @ W + (s dout B) A,
              dA = (s dout B)^T x, dB = dout^T (s x A^T)
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


def _nf4_needs(ctx) -> tuple:
    # Trailing arguments left at their defaults may be missing from the inputs.
    return tuple(ctx.needs_input_grad) + (False,) * (14 - len(ctx.needs_input_grad))


def _nf4_linear_setup(ctx, inputs, output):
    x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, n = inputs[:9]
    bias, lora_u, lora_B, lora_A, lora_scale = tuple(inputs[9:]) + (None, None, None, None, 1.0)[len(inputs) - 9 :]
    ctx.nf4 = (offset, blocksize, nested_blocksize, x.shape[1])
    ctx.n_inputs = len(inputs)
    ctx.has_bias, ctx.has_lora, ctx.own_u = bias is not None, lora_u is not None or lora_A is not None, lora_A is not None
    ctx.lora_scale = float(lora_scale)
    needs = _nf4_needs(ctx)
    need_x, need_u, need_b, need_a = needs[0], needs[10], needs[11], needs[12]
    # With lora_A the op made u = s x A^T itself: dx and dA need du = s dout B, dB needs u again.
    ctx.save_for_backward(
        packed, absmax, nested_absmax, nested_code,
        lora_u if need_b else None, lora_B if need_u or ctx.own_u else None,
        x if ctx.own_u and (need_a or need_b) else None, lora_A if ctx.own_u else None,
    )


def _nf4_linear_backward(ctx, dout):
    packed, absmax, nested_absmax, nested_code, lora_u, lora_B, x, lora_A = ctx.saved_tensors
    offset, blocksize, nested_blocksize, k = ctx.nf4
    needs = _nf4_needs(ctx)
    dout = dout.contiguous()
    dx = db = du = dB = dA = None
    if needs[9] and ctx.has_bias:
        db = dout.sum(0)
    if ctx.own_u:
        s = ctx.lora_scale
        dus = None
        if needs[11] or needs[12]:  # du, dA, dB in one op
            dus, dA, dB = _ops.lora_adapter_grads(dout, x, lora_A, lora_B, s, None, needs[12], needs[11])
            dA, dB = (dA if needs[12] else None), (dB if needs[11] else None)
        elif needs[0]:
            dus = torch.mm(dout, lora_B).mul_(s)
        if needs[0]:
            dx = _ops.nf4_linear_grad_input(
                dout, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, k, dus, lora_A,
                lora_B, s,
            )
        return (dx, None, None, None, None, None, None, None, None, db, None, dB, dA, None)[: ctx.n_inputs]
    if needs[0]:
        dx = _ops.nf4_linear_grad_input(
            dout, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, k
        )
    if needs[10] and ctx.has_lora:
        du = torch.mm(dout, lora_B)
    if needs[11] and ctx.has_lora:
        dB = torch.mm(dout.t(), lora_u)
    return (dx, None, None, None, None, None, None, None, None, db, du, dB, None, None)[: ctx.n_inputs]


torch.library.register_autograd("lora_fused::lora_shrink", _shrink_backward, setup_context=_shrink_setup)
torch.library.register_autograd("lora_fused::lora_expand", _expand_backward, setup_context=_expand_setup)
torch.library.register_autograd("lora_fused::nf4_linear", _nf4_linear_backward, setup_context=_nf4_linear_setup)
