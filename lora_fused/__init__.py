"""lora_fused: fused CUDA kernels for LoRA and QLoRA layers, as PyTorch ops.

    import lora_fused
    y = lora_fused.lora_linear(x, weight, lora_A, lora_B, scaling)   # functional
    layer = lora_fused.LoraLinear.from_linear(linear, r=16, lora_alpha=32)
    packed, state = lora_fused.nf4.quantize(w)                       # bitsandbytes-compatible NF4
"""

from ._extension import build_info, cuda_available
from . import _ops as ops
from . import nf4
from .functional import lora_linear
from .modules import LoraLinear
from .patch import PatchReport, patch, unpatch

__version__ = build_info()["version"]

__all__ = ["LoraLinear", "PatchReport", "build_info", "cuda_available", "lora_linear", "nf4", "ops", "patch", "unpatch"]
