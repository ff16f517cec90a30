"""Typed wrappers over the compiled ops (torch.ops.lora_fused.*) and their fake kernels.

The schemas live in csrc/registration.cpp; the fake kernels here give torch.compile and
torch.library.opcheck the output metadata without running anything.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._extension import load_extension

load_extension()
_ops = torch.ops.lora_fused


def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """u = scale * x @ lora_A.T for x [M, k], lora_A [r, k]; u is [M, r] in x's dtype."""
    return _ops.lora_shrink.default(x, lora_A, float(scale))


def lora_expand(y: torch.Tensor, u: torch.Tensor, lora_B: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """y + scale * u @ lora_B.T for y [M, d], u [M, r], lora_B [d, r] (a new tensor)."""
    return _ops.lora_expand.default(y, u, lora_B, float(scale))


def lora_decode(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x @ weight.T + scale * (x @ lora_A.T) @ lora_B.T + bias for 2-D x, without autograd (inference)."""
    return _ops.lora_decode.default(x, weight, lora_A, lora_B, float(scale), bias)


def nf4_quantize(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [(n+1)//2, 1], absmax fp32 [ceil(n/blocksize)]) in bitsandbytes' NF4 layout."""
    return _ops.nf4_quantize.default(w, int(blocksize))


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: float,
    blocksize: int,
    nested_blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    return _ops.nf4_dequantize.default(
        packed, absmax, nested_absmax, nested_code, float(offset), int(blocksize), int(nested_blocksize),
        list(shape), dtype,
    )


def nf4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: float,
    blocksize: int,
    nested_blocksize: int,
    out_features: int,
    bias: Optional[torch.Tensor] = None,
    lora_u: Optional[torch.Tensor] = None,
    lora_B: Optional[torch.Tensor] = None,
    lora_A: Optional[torch.Tensor] = None,
    lora_scale: float = 1.0,
) -> torch.Tensor:
    """x @ W^T + bias + u @ lora_B^T for x [M, K] and the NF4 weight W [out_features, K], with
    u = lora_u [M, r], or u = lora_scale * x @ lora_A^T (lora_A [r, K]) computed by the op."""
    return _ops.nf4_linear.default(
        x, packed, absmax, nested_absmax, nested_code, float(offset), int(blocksize), int(nested_blocksize),
        int(out_features), bias, lora_u, lora_B, lora_A, float(lora_scale),
    )


def nf4_linear_with_u(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: float,
    blocksize: int,
    nested_blocksize: int,
    out_features: int,
    bias: Optional[torch.Tensor],
    lora_B: torch.Tensor,
    lora_A: torch.Tensor,
    lora_scale: float,
) -> tuple:
    """(nf4_linear's out with lora_A, u = lora_scale * x @ lora_A^T [M, r]): u for the backward's
    dB = grad_out^T u, made by the forward (on the merged slab path by the first slab's GEMM)."""
    return _ops.nf4_linear_with_u.default(
        x, packed, absmax, nested_absmax, nested_code, float(offset), int(blocksize), int(nested_blocksize),
        int(out_features), bias, lora_B, lora_A, float(lora_scale),
    )


def nf4_linear_grad_input(
    grad_out: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: float,
    blocksize: int,
    nested_blocksize: int,
    in_features: int,
    lora_du: Optional[torch.Tensor] = None,
    lora_A: Optional[torch.Tensor] = None,
    lora_B: Optional[torch.Tensor] = None,
    lora_scale: float = 1.0,
) -> torch.Tensor:
    """grad_out @ W + lora_du @ lora_A for grad_out [M, N], the NF4 weight W [N, in_features] and
    the optional LoRA pair lora_du [M, r], lora_A [r, in_features]. lora_B [N, r] with lora_scale
    stands for lora_du = lora_scale * grad_out @ lora_B (given both, the op uses either): the op may
    then add lora_scale * lora_B @ lora_A to each decoded slab of W instead of making the [M, K] term."""
    return _ops.nf4_linear_grad_input.default(
        grad_out, packed, absmax, nested_absmax, nested_code, float(offset), int(blocksize), int(nested_blocksize),
        int(in_features), lora_du, lora_A, lora_B, float(lora_scale),
    )


def gemm_concat_k(
    a: torch.Tensor, b: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """a @ b.T + a2 @ b2.T + bias as one GEMM over the concatenated K (a [M, K1], b [N, K1], a2 [M, K2],
    b2 [N, K2], bias [N]) -> [M, N]; no autograd. Two cuBLAS GEMMs (the second accumulating onto the
    first); on Hopper one CUTLASS kernel when LORA_FUSED_GEMM_CONCAT_K=sm90 (or =auto, for large problems)."""
    return _ops.gemm_concat_k.default(a, b, a2, b2, bias)


def lora_dropout(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """x * keep / (1 - p) for x [M, K], keep drawn by Philox4x32-10 from (seed, element index): the same
    seed and shape give the same mask (CPU and CUDA alike), so backward regenerates it. No autograd."""
    return _ops.lora_dropout.default(x, float(p), seed)


def lora_adapter_grads(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    u: Optional[torch.Tensor] = None,
    need_A: bool = True,
    need_B: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LoRA branch's backward in one op: (du = scale * grad_out @ lora_B [M, r], dA = du^T @ x [r, K],
    dB = grad_out^T @ u [N, r]), u = scale * x @ lora_A^T unless given; x is the branch's input (after
    dropout). A gradient not needed comes back with 0 rows. No autograd."""
    return _ops.lora_adapter_grads.default(grad_out, x, lora_A, lora_B, float(scale), u, bool(need_A), bool(need_B))


def dropout_seed(device: torch.device) -> torch.Tensor:
    """A fresh lora_dropout seed from torch's generator for `device` (CUDA-graph safe on CUDA)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def blockwise_quantize(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of fp32 x to the nearest entry of a sorted 256-value code."""
    return _ops.blockwise_quantize.default(x, code, int(blocksize))


@torch.library.register_fake("lora_fused::lora_shrink")
def _lora_shrink_fake(x, lora_A, scale=1.0):
    torch._check(x.dim() == 2 and lora_A.dim() == 2, lambda: "lora_shrink: x and lora_A must be 2-D")
    torch._check(x.shape[1] == lora_A.shape[1], lambda: "lora_shrink: x [M, k] and lora_A [r, k] disagree on k")
    return x.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.register_fake("lora_fused::lora_expand")
def _lora_expand_fake(y, u, lora_B, scale=1.0):
    torch._check(y.dim() == 2 and u.dim() == 2 and lora_B.dim() == 2, lambda: "lora_expand: operands must be 2-D")
    torch._check(u.shape[0] == y.shape[0], lambda: "lora_expand: y [M, d] and u [M, r] disagree on M")
    torch._check(lora_B.shape[0] == y.shape[1], lambda: "lora_expand: y [M, d] and lora_B [d, r] disagree on d")
    torch._check(lora_B.shape[1] == u.shape[1], lambda: "lora_expand: u [M, r] and lora_B [d, r] disagree on r")
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.register_fake("lora_fused::lora_decode")
def _lora_decode_fake(x, weight, lora_A, lora_B, scale, bias=None):
    torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "lora_decode: x and weight must be 2-D")
    torch._check(x.shape[1] == weight.shape[1], lambda: "lora_decode: x [M, k] and weight [d, k] disagree on k")
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("lora_fused::nf4_quantize")
def _nf4_quantize_fake(w, blocksize):
    n = w.numel()
    packed = w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = w.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake("lora_fused::nf4_dequantize")
def _nf4_dequantize_fake(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake("lora_fused::nf4_linear")
def _nf4_linear_fake(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features,
                     bias=None, lora_u=None, lora_B=None, lora_A=None, lora_scale=1.0):
    torch._check(x.dim() == 2, lambda: "nf4_linear: x must be [M, K]")
    torch._check(packed.numel() == (out_features * x.shape[1] + 1) // 2, lambda: "nf4_linear: packed does not hold W")
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("lora_fused::nf4_linear_with_u")
def _nf4_linear_with_u_fake(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                            out_features, bias, lora_B, lora_A, lora_scale):
    out = _nf4_linear_fake(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                           out_features, bias, None, lora_B, lora_A, lora_scale)
    torch._check(lora_A.dim() == 2 and lora_A.shape[1] == x.shape[1], lambda: "nf4_linear_with_u: lora_A must be [r, K]")
    return out, x.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.register_fake("lora_fused::nf4_linear_grad_input")
def _nf4_linear_grad_input_fake(grad_out, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                nested_blocksize, in_features, lora_du=None, lora_A=None, lora_B=None, lora_scale=1.0):
    torch._check(grad_out.dim() == 2, lambda: "nf4_linear_grad_input: grad_out must be [M, N]")
    torch._check((lora_du is None and lora_B is None) == (lora_A is None),
                 lambda: "nf4_linear_grad_input: lora_A comes with lora_du and/or lora_B")
    return grad_out.new_empty((grad_out.shape[0], in_features))


@torch.library.register_fake("lora_fused::gemm_concat_k")
def _gemm_concat_k_fake(a, b, a2, b2, bias=None):
    torch._check(a.dim() == 2 and b.dim() == 2 and a2.dim() == 2 and b2.dim() == 2, lambda: "gemm_concat_k: operands must be 2-D")
    torch._check(b.shape[1] == a.shape[1] and a2.shape[0] == a.shape[0], lambda: "gemm_concat_k: a, b, a2 disagree")
    torch._check(b2.shape[0] == b.shape[0] and b2.shape[1] == a2.shape[1], lambda: "gemm_concat_k: b2 disagrees")
    return a.new_empty((a.shape[0], b.shape[0]))


@torch.library.register_fake("lora_fused::lora_dropout")
def _lora_dropout_fake(x, p, seed):
    torch._check(x.dim() == 2, lambda: "lora_dropout: x must be [M, K]")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("lora_fused::lora_adapter_grads")
def _lora_adapter_grads_fake(grad_out, x, lora_A, lora_B, scale, u=None, need_A=True, need_B=True):
    torch._check(grad_out.dim() == 2 and x.dim() == 2 and lora_A.dim() == 2 and lora_B.dim() == 2,
                 lambda: "lora_adapter_grads: operands must be 2-D")
    torch._check(x.shape[0] == grad_out.shape[0] and lora_A.shape[1] == x.shape[1], lambda: "lora_adapter_grads: x disagrees")
    torch._check(lora_B.shape[0] == grad_out.shape[1] and lora_B.shape[1] == lora_A.shape[0],
                 lambda: "lora_adapter_grads: lora_B disagrees")
    r = lora_A.shape[0]
    du = grad_out.new_empty((grad_out.shape[0], r))
    dA = grad_out.new_empty((r if need_A else 0, x.shape[1]))
    dB = grad_out.new_empty((grad_out.shape[1] if need_B else 0, r))
    return du, dA, dB


@torch.library.register_fake("lora_fused::blockwise_quantize")
def _blockwise_quantize_fake(x, code, blocksize):
    q = torch.empty_like(x, dtype=torch.uint8, memory_format=torch.contiguous_format)
    absmax = x.new_empty(((x.numel() + blocksize - 1) // blocksize,), dtype=torch.float32)
    return q, absmax
