"""lora_fused: fused CUDA kernels for LoRA and QLoRA layers, as PyTorch ops.

    import lora_fused
    y = lora_fused.lora_linear(x, weight, lora_A, lora_B, scaling)   # functional
    layer = lora_fused.LoraLinear.from_linear(linear, r=16, lora_alpha=32)
    packed, state = lora_fused.nf4.quantize(w)                       # bitsandbytes-compatible NF4
    y = lora_fused.qlora_linear(x, packed, state, lora_A, lora_B, scaling)   # QLoRA, NF4 base
    lora_fused.patch(model)                                          # fused layers into a PEFT model
    lora_fused.save_adapter(model, "out/")                           # PEFT's adapter format
"""

from ._extension import build_info, cuda_available
from .adapters import load_adapter, save_adapter
from . import _ops as ops
from . import nf4
from .distributed import fsdp_ignored_params
from .functional import lora_linear, nf4_linear, qlora_linear
from .modules import LoraLinear, NF4Linear, QLoraLinear
from .patch import PatchReport, patch, unpatch

__version__ = build_info()["version"]

__all__ = [
    "LoraLinear",
    "NF4Linear",
    "PatchReport",
    "QLoraLinear",
    "build_info",
    "cuda_available",
    "fsdp_ignored_params",
    "load_adapter",
    "lora_linear",
    "nf4",
    "nf4_linear",
    "ops",
    "patch",
    "qlora_linear",
    "save_adapter",
    "unpatch",
]
