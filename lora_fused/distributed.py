"""What FSDP2 needs to be told about NF4 layers on older PyTorch.

The NF4 storage (packed weight, absmax codes) is uint8. FSDP2 shards uint8 parameters, and its
mixed precision leaves them alone, from PyTorch 2.12 on; in 2.11 and before, `fully_shard` fails on
them ("only Tensors of floating point dtype can require gradients"). There, pass them as
`ignored_params`: they then stay whole on every rank (correct, not memory-sharded), while FSDP2
shards everything else.

    from torch.distributed.fsdp import fully_shard
    for block in model.model.layers:
        fully_shard(block, ignored_params=lora_fused.fsdp_ignored_params(block))
    fully_shard(model, ignored_params=lora_fused.fsdp_ignored_params(model))

On PyTorch >= 2.12 fsdp_ignored_params returns an empty set, so the same script shards the NF4
storage there.
"""

from __future__ import annotations

import torch
from torch import nn

from .modules import NF4Linear


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


FSDP2_SHARDS_INTEGER_PARAMS = _torch_version() >= (2, 12)


def nf4_storage_params(module: nn.Module) -> set[nn.Parameter]:
    """The uint8 Parameters (packed weights, absmax codes) of the NF4 layers in `module`."""
    return {p for m in module.modules() if isinstance(m, NF4Linear) for p in m.parameters() if p.dtype == torch.uint8}


def fsdp_ignored_params(module: nn.Module) -> set[nn.Parameter]:
    """`ignored_params` for fully_shard(module): the NF4 storage where this PyTorch's FSDP2 cannot
    shard it (< 2.12), else nothing."""
    return set() if FSDP2_SHARDS_INTEGER_PARAMS else nf4_storage_params(module)
