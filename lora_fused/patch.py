"""Swapping lora_fused into an existing model without changing the training script.

    report = lora_fused.patch(model)      # PEFT LoRA layers now run lora_fused.lora_linear
    lora_fused.unpatch(model)             # and back

PEFT LoRA layers keep their module, parameters and state-dict keys: only their forward is replaced,
so an optimizer created before the patch, `save_pretrained` and checkpoints keep working. Plain
`nn.Linear` layers named by `target_modules` become `LoraLinear`s that share the linear's weight and
bias. What the fused path cannot express is left as it is and reported with the reason, never
silently computed differently.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn

from .functional import lora_linear
from .modules import LoraLinear, QLoraLinear

_ORIGINAL_FORWARD = "_lora_fused_original_forward"
_ORIGINAL_MODULE = "_lora_fused_original_module"
_PATCHED_FROM_LINEAR = "_lora_fused_quantized_by_patch"


@dataclass
class PatchReport:
    patched: list[str] = field(default_factory=list)  # module names now on the fused path
    left: dict[str, str] = field(default_factory=dict)  # module name -> why it was left as it is

    def __str__(self) -> str:
        lines = [f"lora_fused.patch: {len(self.patched)} layer(s) fused, {len(self.left)} left"]
        lines += [f"  left {name}: {why}" for name, why in self.left.items()]
        return "\n".join(lines)


def _peft_lora_linear_class():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return None
    return Linear


def _why_not_fusable(layer) -> Optional[str]:
    """The reason a PEFT LoRA layer cannot take the fused path, or None."""
    if type(layer.base_layer) is not nn.Linear:
        return f"base layer is {type(layer.base_layer).__name__}; the fused path takes nn.Linear (NF4 bases come with QLoraLinear)"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters; the fused path computes exactly one"
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return f"adapter {name!r} is a LoRA variant (DoRA or similar)"
    if getattr(layer, "lora_bias", {}).get(name, False):
        return f"adapter {name!r} has lora_bias"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out weights (stored transposed)"
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return f"dropout module {type(dropout).__name__}"
    return None


def _fused_peft_forward(self, x, *args, **kwargs):
    """PEFT's LoRA Linear forward, computed by lora_fused.lora_linear; anything outside the plain case
    (disabled or merged adapters, mixed-batch adapter_names, changed adapters) goes to PEFT's own."""
    original = getattr(self, _ORIGINAL_FORWARD)
    if args or kwargs or self.disable_adapters or self.merged or _why_not_fusable(self) is not None:
        return original(x, *args, **kwargs)
    name = next(a for a in self.active_adapters if a in self.lora_A)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    base = self.base_layer
    return lora_linear(
        x, base.weight, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], base.bias,
        dropout_p=p, training=self.training,
    )


def _matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def patch(
    model: nn.Module,
    target_modules: Optional[Iterable[str]] = None,
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    quantize: Optional[str] = None,
    blocksize: int = 64,
    double_quant: bool = True,
) -> PatchReport:
    """Put the fused LoRA path into `model`, in place, and report what was fused and what was left.

    - PEFT LoRA layers on nn.Linear: their forward becomes lora_fused.lora_linear over the SAME
      parameters (the active adapter).
    - Plain nn.Linear layers whose name is, or ends with, one of `target_modules` (as in PEFT's
      LoraConfig): replaced by LoraLinear(r, lora_alpha, lora_dropout) sharing the weight and bias;
      with quantize="nf4", by QLoraLinear (QLoRA: the weight quantized to NF4 with `blocksize` and
      `double_quant`, the 16-bit weight released; unpatch() gives back its dequantized copy).
    """
    if quantize not in (None, "nf4"):
        raise ValueError(f"lora_fused.patch: quantize must be None or 'nf4'; got {quantize!r}")
    report = PatchReport()
    peft_linear = _peft_lora_linear_class()
    targets = list(target_modules or [])
    for name, module in list(model.named_modules()):
        if peft_linear is not None and isinstance(module, peft_linear):
            if hasattr(module, _ORIGINAL_FORWARD):
                report.patched.append(name)
                continue
            why = _why_not_fusable(module)
            if why is not None:
                report.left[name] = why
                continue
            setattr(module, _ORIGINAL_FORWARD, module.forward)
            module.forward = types.MethodType(_fused_peft_forward, module)
            report.patched.append(name)
        elif targets and type(module) is nn.Linear and _matches(name, targets):
            if peft_linear is not None and any(isinstance(m, peft_linear) and m.base_layer is module for m in model.modules()):
                continue  # the base layer inside a PEFT layer: handled through the PEFT layer
            if quantize == "nf4":
                fused = QLoraLinear.from_linear(
                    module, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, blocksize=blocksize, double_quant=double_quant
                )
            else:
                fused = LoraLinear.from_linear(module, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
                setattr(fused, _ORIGINAL_MODULE, module)
            fused.train(module.training)
            if quantize == "nf4":
                setattr(fused, _PATCHED_FROM_LINEAR, True)
            _set_submodule(model, name, fused)
            report.patched.append(name)
    return report


def unpatch(model: nn.Module) -> list[str]:
    """Undo patch(): PEFT layers get their own forward back, LoraLinears from target_modules are
    replaced by the original nn.Linear (whose weight they shared), QLoraLinears it quantized by an
    nn.Linear holding the dequantized weight (the adapter is dropped). Returns the names restored."""
    restored = []
    for name, module in list(model.named_modules()):
        if hasattr(module, _ORIGINAL_FORWARD):
            del module.forward  # drop the instance attribute: the class's forward is back
            delattr(module, _ORIGINAL_FORWARD)
            restored.append(name)
        elif isinstance(module, LoraLinear) and hasattr(module, _ORIGINAL_MODULE):
            _set_submodule(model, name, getattr(module, _ORIGINAL_MODULE))
            restored.append(name)
        elif type(module) is QLoraLinear and getattr(module, _PATCHED_FROM_LINEAR, False):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=module.weight.device, dtype=module.quant_dtype)
            with torch.no_grad():
                linear.weight.copy_(module.dequantize(module.quant_dtype))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            linear.train(module.training)
            _set_submodule(model, name, linear)
            restored.append(name)
    return restored


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
