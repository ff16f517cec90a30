"""Where an NF4 layer keeps its quantization state, so that DDP, FSDP2 (`fully_shard`) and
torch.distributed.checkpoint handle it without knowing about NF4.

    layer.weight                                  packed 4-bit weight, uint8 Parameter (frozen)
    layer.nf4_state.weight.absmax                 uint8 absmax codes: Parameter (frozen); fp32 absmax: buffer
    layer.nf4_state.weight.quant_map              buffers: the NF4 levels, the double-quantization
    layer.nf4_state.weight.nested_absmax          scales and code, and bitsandbytes' JSON metadata
    layer.nf4_state.weight.nested_quant_map
    layer.nf4_state.weight.quant_state.bitsandbytes__nf4

Why this shape:
- What grows with the weight is a Parameter when it is uint8 (the packed bytes; absmax codes when
  double-quantized, QLoRA's format), so FSDP2 shards it on dim 0, all-gathers it for forward, and its
  mixed precision leaves it alone (integer parameters are not cast). Each tensor keeps bitsandbytes'
  shape and dtype, because the checkpoint helpers copy shards straight into it.
- fp32 absmax (double_quant=False) is a buffer: replicated (1/8 of the packed weight's bytes on each
  rank), because as a Parameter FSDP2's `param_dtype=bf16` would round it. The small tables are
  buffers as well: replicated, never cast.
- The layer's state dict uses bitsandbytes' keys (`weight.absmax`, ...). `nf4_state` is named in
  `_fqn_modifiers` (torch.distributed.checkpoint's hook for modules whose state-dict keys skip a
  level), so the checkpoint helpers resolve `layer.weight.absmax` to the tensor here and the keys they
  expect equal the keys the layer writes.
- The layer writes and reads these entries itself (NF4Linear._save_to/_load_from_state_dict); the
  modules here add nothing to the state dict on their own.
"""

from __future__ import annotations


import torch
from torch import nn

from . import nf4 as _nf4

HOLDER = "nf4_state"  # the attribute of the layer that torch.distributed.checkpoint skips
JSON_KEY = "bitsandbytes__nf4"


class _Silent(nn.Module):
    """A module whose tensors the owning NF4 layer saves and loads under bitsandbytes' keys."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        pass


class NF4QuantState(_Silent):
    """The tensors of an NF4 QuantState, at the attribute paths of bitsandbytes' state-dict keys."""

    def __init__(self, state: "_nf4.QuantState"):
        super().__init__()
        if state.absmax.dtype == torch.uint8:
            self.absmax = nn.Parameter(state.absmax, requires_grad=False)
        else:
            self.register_buffer("absmax", state.absmax)
        self.register_buffer("quant_map", state.code)
        s2 = state.state2
        self.register_buffer("nested_absmax", s2.absmax if s2 is not None else None)
        self.register_buffer("nested_quant_map", s2.code if s2 is not None else None)
        self.quant_state = _Silent()
        meta = padded_json(state.as_dict(packed=True)[_nf4.QS_KEY])
        self.quant_state.register_buffer(JSON_KEY, meta.to(state.absmax.device))


class NF4StateHolder(_Silent):
    """`layer.nf4_state`: holds `weight` (an NF4QuantState); its own name never reaches a key."""

    def __init__(self, state: "_nf4.QuantState"):
        super().__init__()
        self.weight = NF4QuantState(state)


def padded_json(meta: torch.Tensor, multiple: int = 256) -> torch.Tensor:
    """bitsandbytes' UTF-8 JSON metadata padded with spaces to a multiple of 256 bytes, so that layers
    whose double-quantization offsets print with different numbers of digits still have buffers of
    one size (torch.distributed.checkpoint loads into the existing buffer). JSON ignores the spaces."""
    pad = -meta.numel() % multiple
    return torch.cat([meta, torch.full((pad,), ord(" "), dtype=torch.uint8)])


def as_uint8(t: torch.Tensor) -> torch.Tensor:
    """A uint8 parameter as the kernels take it. Torch versions whose FSDP2 mixed precision also
    casts integer parameters hand it over as floats; the values 0..255 survive any float cast exactly."""
    return t if t.dtype == torch.uint8 else t.to(torch.uint8)
