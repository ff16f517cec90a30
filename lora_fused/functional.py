"""Functional entry points: lora_linear (and, as the NF4/QLoRA issues land, nf4_linear and qlora_linear)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _autograd  # noqa: F401  (registers the backward formulas)
from . import _ops


def _check_lora_linear_args(x, weight, lora_A, lora_B, bias, dropout_p):
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lora_fused.lora_linear: {name} must be a tensor; got {type(t).__name__}")
    if x.dim() < 1 or weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(
            "lora_fused.lora_linear: expected x [..., k], weight [d, k], lora_A [r, k], lora_B [d, r]; got "
            f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}"
        )
    d, k = weight.shape
    r = lora_A.shape[0]
    if x.shape[-1] != k or lora_A.shape[1] != k or tuple(lora_B.shape) != (d, r) or r < 1:
        raise ValueError(
            "lora_fused.lora_linear: expected x [..., k], weight [d, k], lora_A [r, k], lora_B [d, r] with r >= 1; got "
            f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"lora_fused.lora_linear: bias must have shape ({d},); got {tuple(bias.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lora_fused.lora_linear: dropout_p must be in [0, 1); got {dropout_p}")
    devices = {t.device for t in (x, weight, lora_A, lora_B) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise RuntimeError(f"lora_fused.lora_linear: all tensors must be on one device; got {sorted(map(str, devices))}")
    if x.dtype != weight.dtype:
        raise TypeError(f"lora_fused.lora_linear: x and weight must have the same dtype; got {x.dtype} and {weight.dtype}")


DECODE_MAX_M = 16  # lora_decode's fused kernel covers M <= 16


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """x @ weight^T + bias + scaling * (dropout(x) @ lora_A^T) @ lora_B^T.

    x: [..., k]; weight: [d, k], frozen (never gets a gradient); lora_A: [r, k]; lora_B: [d, r];
    bias: [d] or None. Adapters in another dtype than x (fp32 adapters on a bf16 model, as PEFT
    keeps them) are used in x's dtype; their gradients flow back in their own dtype.

    Inference with at most 16 tokens on CUDA runs lora_decode's fused kernel (the weight streamed
    once, LoRA in the same pass). Otherwise the layer is three cuBLAS GEMMs with the LoRA term folded
    into the base GEMM's epilogue (beta = 1), so no separate scale or add pass; dropout is torch's
    (its mask is kept for backward).
    """
    _check_lora_linear_args(x, weight, lora_A, lora_B, bias, dropout_p)
    k, d = weight.shape[1], weight.shape[0]
    x2 = x.reshape(-1, k)
    A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    dropping = dropout_p > 0.0 and training
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, lora_A, lora_B, bias)
    )
    if not needs_grad and not dropping and x2.shape[0] <= DECODE_MAX_M and x2.is_cuda:
        y = _ops.lora_decode(x2, weight, A, B, float(scaling), bias)
    else:
        xl = F.dropout(x2, dropout_p, training=True) if dropping else x2
        u = torch.mm(xl, A.t())
        lora = torch.addmm(bias, u, B.t(), alpha=scaling) if bias is not None else torch.mm(u * scaling, B.t())
        if x2.shape[0] <= DECODE_MAX_M:
            # At a handful of rows cuBLAS serves mm with its GEMV but addmm with a tiled GEMM.
            y = torch.mm(x2, weight.detach().t()) + lora
        else:
            y = torch.addmm(lora, x2, weight.detach().t())
    return y.reshape(*x.shape[:-1], d)
