"""Functional entry points: lora_linear, nf4_linear and qlora_linear."""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import _autograd  # noqa: F401  (registers the backward formulas)
from . import _ops
from .nf4 import QuantState


_LORA_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


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
    if x.dtype not in _LORA_DTYPES:
        raise TypeError(
            f"lora_fused.lora_linear: x must be bfloat16, float16, float32 or float64; got {x.dtype}"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"lora_fused.lora_linear: x and weight must have the same dtype; got {x.dtype} and {weight.dtype}")


GEMV_MAX_M = 16  # up to here cuBLAS serves mm with its GEMV
# Inference rows up to which lora_linear runs lora_decode (its kernels take M <= 16; on an H100 the
# tensor-core one ran M = 16 at 0.64-0.98x eager's time, see benchmarks/RESULTS.md).
FUSED_DECODE_MAX_M = 16


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """s * a @ b for a skinny product (b or the result has r columns): the scale as an in-place pass
    over the [M, r] result. Not addmm(alpha=s, beta=0): on the H100 machine that call cost the host
    137 us against 31 us for mm (torch 2.11 profile, benchmarks/RESULTS.md)."""
    out = torch.mm(a, b)
    return out if s == 1.0 else out.mul_(s)


def _base_plus(x2: torch.Tensor, weight: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """c + x2 @ weight^T, with c folded into the GEMM's epilogue (beta = 1) where that is fast."""
    if x2.shape[0] <= GEMV_MAX_M:
        # At a handful of rows cuBLAS serves mm with its GEMV but addmm with a tiled GEMM.
        return torch.mm(x2, weight.t()) + c
    return torch.addmm(c, x2, weight.t())


def _base_and_lora(x2: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, B: torch.Tensor, bias=None) -> torch.Tensor:
    """x2 @ weight^T + u @ B^T (+ bias): gemm_concat_k above GEMV_MAX_M rows, else cuBLAS's GEMV
    for the base with the (tiny) LoRA term added."""
    if x2.shape[0] > GEMV_MAX_M:
        return _ops.gemm_concat_k(x2, weight, u, B, bias)
    return _base_plus(x2, weight, torch.addmm(bias, u, B.t()) if bias is not None else torch.mm(u, B.t()))


class _LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + bias + (xl A^T s) B^T, xl = x or lora_dropout(x) (p > 0). With more than
    GEMV_MAX_M rows the base and LoRA GEMMs are gemm_concat_k, [x | u]·[W | B]^T with u = s·xl·A^T:
    cuBLAS with the LoRA term as the base GEMM's accumulator (beta = 1), or one CUTLASS kernel over
    K + r on Hopper when asked for (see gemm_concat_k). Backward: dU = s dY B, dB = dY^T u,
    dA = dU^T xl, dX = [dY | dU]·[W ; A] the same way without dropout, dY W + dropout(dU A) with it.
    Dropout keeps no mask and no dropped copy of x: backward regenerates both from the seed."""

    @staticmethod
    def forward(ctx, x, weight, A, B, bias, scaling, p, seed):
        # x of any rank [..., k], flattened here where autograd records no view node (each costs host
        # time forward and backward, as much as a small GEMM's launch on a slow host). The output stays
        # [M, d]: a view made in here could not be modified in place by the caller.
        x2 = x.reshape(-1, x.shape[-1])
        xl = _ops.lora_dropout(x2, p, seed) if p > 0.0 else x2
        u = _scaled_mm(xl, A.t(), scaling)  # scaled once here, so dB = dY^T u needs no scale
        ctx.scaling, ctx.p, ctx.has_bias, ctx.x_shape = scaling, p, bias is not None, x.shape
        ctx.save_for_backward(x2, weight, A, B, u, seed)
        return _base_and_lora(x2, weight, u, B, bias)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, A, B, u, seed = ctx.saved_tensors
        need_x, _, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        s, p = ctx.scaling, ctx.p
        dx = dA = dB = dbias = None
        du = None
        if need_a or need_b:  # du, dA, dB in one op (one host dispatch: the step is host-bound at M = 4096)
            xl = _ops.lora_dropout(x2, p, seed) if p > 0.0 and need_a else x2
            du, dA, dB = _ops.lora_adapter_grads(dy, xl, A, B, s, u, need_a, need_b)
            dA, dB = (dA if need_a else None), (dB if need_b else None)
        elif need_x:
            du = _scaled_mm(dy, B, s)
        if need_x:
            if p > 0.0:
                dx = _base_plus(dy, weight.t(), _ops.lora_dropout(torch.mm(du, A), p, seed))
            else:
                dx = _base_and_lora(dy, weight.t(), du, A.t())
        if need_bias and ctx.has_bias:
            dbias = dy.sum(0)
        if dx is not None and len(ctx.x_shape) != 2:
            dx = dx.reshape(ctx.x_shape)
        return dx, None, dA, dB, dbias, None, None, None


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

    Inference on one token on CUDA runs lora_decode's fused kernel (the weight streamed once, LoRA
    in the same pass). With more than 16 rows, the base and LoRA GEMMs are one GEMM over the
    concatenated K (gemm_concat_k: cuBLAS with the LoRA term as the base GEMM's accumulator; a
    CUTLASS kernel on Hopper is there, not yet the default), forward and input gradient. Dropout
    (on the LoRA branch's input, as PEFT's) is Philox from a seed drawn from torch's generator:
    backward regenerates the mask, so training with dropout keeps no more memory than without.
    """
    _check_lora_linear_args(x, weight, lora_A, lora_B, bias, dropout_p)
    k, d = weight.shape[1], weight.shape[0]
    A = lora_A if lora_A.dtype == x.dtype else lora_A.to(x.dtype)
    B = lora_B if lora_B.dtype == x.dtype else lora_B.to(x.dtype)
    dropping = dropout_p > 0.0 and training
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, lora_A, lora_B, bias)
    )
    if not needs_grad and not dropping and x.numel() <= FUSED_DECODE_MAX_M * k and x.is_cuda:
        y = _ops.lora_decode(x.reshape(-1, k), weight, A, B, float(scaling), bias)
        return y.reshape(*x.shape[:-1], d)
    p = float(dropout_p) if dropping else 0.0
    seed = _ops.dropout_seed(x.device) if dropping else None
    # x goes in unflattened: the autograd node flattens it without recording a view node.
    y = _LoraLinearFunction.apply(x, weight.detach(), A, B, bias, float(scaling), p, seed)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], d)


_NF4_COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _nf4_args(fn: str, x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> tuple:
    if not isinstance(x, torch.Tensor) or not isinstance(packed, torch.Tensor):
        raise TypeError(f"lora_fused.{fn}: x and packed must be tensors; got {type(x).__name__}, {type(packed).__name__}")
    if not isinstance(state, QuantState):
        raise TypeError(f"lora_fused.{fn}: state must be a lora_fused.nf4.QuantState; got {type(state).__name__}")
    if len(state.shape) != 2:
        raise ValueError(f"lora_fused.{fn}: the NF4 weight must be 2-D [out_features, in_features]; got {tuple(state.shape)}")
    if x.dtype not in _NF4_COMPUTE_DTYPES:
        raise TypeError(f"lora_fused.{fn}: x must be bfloat16, float16 or float32 (the compute dtype); got {x.dtype}")
    n, k = int(state.shape[0]), int(state.shape[1])
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"lora_fused.{fn}: x must be [..., {k}] for a weight of shape [{n}, {k}]; got {tuple(x.shape)}")
    s2 = state.state2
    return (
        packed, state.absmax, s2.absmax if s2 is not None else None, s2.code if s2 is not None else None,
        state.offset if state.offset is not None else 0.0, state.blocksize, s2.blocksize if s2 is not None else 256, n,
    )


class _NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + bias [+ (s xl A^T) B^T], W the frozen NF4 weight, xl = x or lora_dropout(x), as
    one autograd node (the op's generated autograd and the eager LoRA ops around it cost the host
    more than the GPU work at M = 4096: benchmarks/RESULTS.md, session 3). Forward without dropout:
    nf4_linear with lora_A, which makes u = s x A^T itself (u B^T is the slab GEMMs' accumulator) or,
    at M >= 2048 on CUDA (LORA_FUSED_NF4_MERGE), adds s B A to each decoded slab of W; with dropout
    u = s xl A^T is made here.
    Backward: dU = s dY B, dB = dY^T u (u made again, or kept from the forward with
    LORA_FUSED_QLORA_KEEP_U=1: see _keep_u; on CUDA dU and dB from one read of dY), dA = dU^T xl
    (lora_adapter_grads) and,
    without dropout, dX from nf4_linear_grad_input given dU, A and B: dY W + dU A with dU A as the
    slab GEMMs' accumulator (no [M, K] add), or dY (W + s B A) merged per slab (as forward); with
    dropout, dX = dY W + dropout(dU A), the mask (and xl) regenerated from the seed, not kept."""

    @staticmethod
    def forward(ctx, x, A, B, bias, scaling, nf4, n, p, seed):
        x2 = x.reshape(-1, x.shape[-1])  # here, not outside: no autograd view node (see lora_linear's)
        xl = _ops.lora_dropout(x2, p, seed) if p > 0.0 else None
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        keep_u = A is not None and need_b and _keep_u()  # u [M, r] for dB = dY^T u
        y, u = _nf4_forward(x2, xl, A, B, bias, scaling, nf4, n, keep_u)
        ctx.scaling, ctx.nf4, ctx.k, ctx.p, ctx.x_shape = scaling, nf4[4:], x2.shape[1], p, x.shape
        ctx.has_lora, ctx.has_bias = A is not None, bias is not None
        ctx.save_for_backward(x2 if (need_a or need_b) else None, A, B, seed, u, *nf4[:4])
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, A, B, seed, u, packed, absmax, nested_absmax, nested_code = ctx.saved_tensors
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        weight = (packed, absmax, nested_absmax, nested_code, *ctx.nf4)
        p = ctx.p
        dy = dy.contiguous()
        dx = dA = dB = dbias = du = None
        if ctx.has_lora and (need_a or need_b):  # du, dA, dB in one op (u from the forward)
            xl = _ops.lora_dropout(x2, p, seed) if p > 0.0 and (need_a or u is None) else x2
            du, dA, dB = _ops.lora_adapter_grads(dy, xl, A, B, ctx.scaling, u, need_a, need_b)
            dA, dB = (dA if need_a else None), (dB if need_b else None)
        elif ctx.has_lora and need_x:
            du = _scaled_mm(dy, B, ctx.scaling)
        if need_x:
            if ctx.has_lora and p == 0.0:  # the op picks dY W + dU A or dY (W + s B A)
                dx = _ops.nf4_linear_grad_input(dy, *weight, ctx.k, du, A, B, ctx.scaling)
            else:
                dx = _ops.nf4_linear_grad_input(dy, *weight, ctx.k)
                if ctx.has_lora:
                    dx.add_(_ops.lora_dropout(torch.mm(du, A), p, seed))
        if need_bias and ctx.has_bias:
            dbias = dy.sum(0)
        if dx is not None and len(ctx.x_shape) != 2:
            dx = dx.reshape(ctx.x_shape)
        return dx, dA, dB, dbias, None, None, None, None, None


def _keep_u() -> bool:
    """LORA_FUSED_QLORA_KEEP_U=1: qlora_linear keeps u = s xl A^T from the forward for dB
    (nf4_linear_with_u; merged on the slab path, the first slab's GEMM makes it) instead of making it
    again in the backward. Off by default: on an H100 the step was not faster with it (1249.0 us
    against 1242.5 in an earlier call, benchmarks/RESULTS.md session 18), not yet A/B'd in one process.
    Read at each call (under torch.compile, when compiled)."""
    v = os.environ.get("LORA_FUSED_QLORA_KEEP_U", "")
    if v not in ("", "0", "1"):
        raise ValueError(f"LORA_FUSED_QLORA_KEEP_U must be unset, 0 or 1; got {v!r}")
    return v == "1"


def _nf4_forward(x2, xl, A, B, bias, scaling, nf4, n, keep_u=False):
    """The forward of _NF4LinearFunction, also run directly where no gradient is needed: (y, u), u =
    s xl A^T when keep_u, else None. Without dropout the op gets lora_A and makes u = s x A^T itself
    (decode kernels, Hopper GEMM, slabs) or merges s B A into the weight's slabs (LORA_FUSED_NF4_MERGE;
    nf4_linear_with_u then gives u too); with dropout u = s xl A^T is made here."""
    u = None
    if A is None:
        op, lora = _ops.nf4_linear, (bias,)
    elif xl is None and keep_u:
        op, lora = _ops.nf4_linear_with_u, (bias, B, A, float(scaling))
    elif xl is None:
        op, lora = _ops.nf4_linear, (bias, None, B, A, float(scaling))
    else:
        u = _scaled_mm(xl, A.t(), scaling)
        op, lora = _ops.nf4_linear, (bias, u, B)
    if torch.compiler.is_compiling():
        y = op(x2, *nf4, n, *lora)
    else:
        # Straight to the backend kernel: the op's Autograd kernel (torch.library.register_autograd, in
        # Python) would otherwise run and redispatch even with grad mode off (~15 us of host on CPU).
        with torch._C._AutoDispatchBelowAutograd():
            y = op(x2, *nf4, n, *lora)
    if op is _ops.nf4_linear_with_u:
        y, u = y
    return y, (u if keep_u else None)


def _nf4_apply(x, A, B, bias, scaling, args, p=0.0):
    """The NF4 layer on x [..., K] -> [..., N], through the autograd node only when a gradient is
    wanted; p > 0 drops out the LoRA branch's input (lora_dropout, a fresh seed from torch's generator)."""
    nf4, n = args[:-1], args[-1]
    seed = _ops.dropout_seed(x.device) if p > 0.0 else None
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, A, B, bias))
    if wants_grad:
        y = _NF4LinearFunction.apply(x, A, B, bias, float(scaling), nf4, n, float(p), seed)
    else:
        x2 = x.reshape(-1, x.shape[-1])
        xl = _ops.lora_dropout(x2, p, seed) if p > 0.0 else None
        y = _nf4_forward(x2, xl, A, B, bias, float(scaling), nf4, n)[0]
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ dequantize(packed, state)^T + bias, with the NF4 weight decoded inside the kernels.

    x: [..., K] in the compute dtype (bf16, fp16 or fp32); packed/state: an NF4 weight [N, K] as
    lora_fused.nf4.quantize (or bitsandbytes) makes it; bias: [N] in x's dtype or None. Gradients flow
    to x and bias; the weight is frozen. On CUDA, up to 16 rows run a kernel that streams the 4-bit
    weight once; more rows decode the weight one bounded slab at a time into cuBLAS: N*K/4 elements
    clamped to [2^22, 2^24] (LORA_FUSED_NF4_SLAB_ELEMS overrides), so at most a quarter of the
    16-bit weight beyond 4M-element (8 MiB) layers, never more than 32 MiB.
    """
    return _nf4_apply(x, None, None, bias, 1.0, _nf4_args("nf4_linear", x, packed, state))


def qlora_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """x @ dequantize(W)^T + bias + scaling * (dropout(x) @ lora_A^T) @ lora_B^T with an NF4 base W.

    lora_A: [r, K], lora_B: [N, r] (any float dtype; used in x's dtype, gradients in their own).
    The LoRA term enters the NF4 matmul's output directly: in the decode kernel's epilogue (M <= 16 on
    CUDA), or as the accumulator the GEMMs add onto (beta = 1), so it costs no extra pass, or (slab
    path, M >= 2048, LORA_FUSED_NF4_MERGE) added to each decoded slab of the weight: x (W + s B A)^T; backward
    likewise for dX. One autograd node for the layer.
    Dropout is Philox from a seed (lora_dropout): backward regenerates its mask, no copy is kept.
    """
    args = _nf4_args("qlora_linear", x, packed, state)
    n, k = args[-1], x.shape[-1]
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lora_fused.qlora_linear: {name} must be a tensor; got {type(t).__name__}")
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] < 1 or lora_A.shape[1] != k or tuple(lora_B.shape) != (n, lora_A.shape[0]):
        raise ValueError(
            f"lora_fused.qlora_linear: expected lora_A [r, {k}] and lora_B [{n}, r] with r >= 1; got "
            f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lora_fused.qlora_linear: dropout_p must be in [0, 1); got {dropout_p}")
    A = lora_A if lora_A.dtype == x.dtype else lora_A.to(x.dtype)
    B = lora_B if lora_B.dtype == x.dtype else lora_B.to(x.dtype)
    return _nf4_apply(x, A, B, bias, scaling, args, float(dropout_p) if training else 0.0)
