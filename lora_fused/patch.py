"""Swapping lora_fused into an existing model without changing the training script.

    report = lora_fused.patch(model)      # PEFT LoRA layers now run lora_fused.lora_linear / qlora_linear
    lora_fused.unpatch(model)             # and back

PEFT LoRA layers (on nn.Linear, or on a bitsandbytes NF4 Linear4bit: QLoRA) keep their module,
parameters and state-dict keys: only their forward is replaced, so an optimizer created before the
patch, `save_pretrained` and checkpoints keep working. Plain `nn.Linear` layers named by
`target_modules` become `LoraLinear`s that share the linear's weight and bias; bitsandbytes NF4
`Linear4bit` layers outside PEFT become `NF4Linear`s (or `QLoraLinear`s when targeted) over the same
bytes. What the fused path cannot express is left as it is and reported with the reason, never
silently computed differently.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn

from . import nf4 as _nf4
from .functional import lora_linear, qlora_linear
from .modules import LoraLinear, NF4Linear, QLoraLinear, _bnb_weight

_ORIGINAL_FORWARD = "_lora_fused_original_forward"
_ORIGINAL_MODULE = "_lora_fused_original_module"
_PATCHED_FROM_LINEAR = "_lora_fused_quantized_by_patch"
_NF4_CACHE = "_lora_fused_nf4_state"  # (bnb QuantState, bnb weight Parameter, lora_fused QuantState)


def remember_original(fused: nn.Module, original: nn.Module) -> None:
    """Keep the module a fused one replaced, for unpatch(), as a plain attribute: registered as a
    submodule it would add its parameters and state-dict keys to the model a second time."""
    fused.__dict__[_ORIGINAL_MODULE] = original


@dataclass
class PatchReport:
    patched: list[str] = field(default_factory=list)  # module names now on the fused path
    left: dict[str, str] = field(default_factory=dict)  # module name -> why it was left as it is

    def __str__(self) -> str:
        lines = [f"lora_fused.patch: {len(self.patched)} layer(s) fused, {len(self.left)} left"]
        lines += [f"  left {name}: {why}" for name, why in self.left.items()]
        return "\n".join(lines)


def _peft_lora_classes() -> tuple:
    """PEFT's LoRA layer classes the fused path takes: on nn.Linear, and on bitsandbytes Linear4bit."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return ()
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except (ImportError, AttributeError):  # PEFT defines it only when bitsandbytes imports
        return (Linear,)
    return (Linear, Linear4bit)


def _bnb_linear4bit_class():
    try:
        import bitsandbytes as bnb
    except Exception:  # bitsandbytes raises more than ImportError on machines it does not support
        return None
    return bnb.nn.Linear4bit


def _why_not_nf4(layer: nn.Module) -> Optional[str]:
    """The reason a bitsandbytes Linear4bit cannot run on lora_fused's NF4 path, or None."""
    qs = getattr(getattr(layer, "weight", None), "quant_state", None)
    if qs is None:
        return "its weight is not quantized yet (bitsandbytes quantizes on the move to a device)"
    if getattr(qs, "quant_type", None) != "nf4":
        return f"quant_type {getattr(qs, 'quant_type', None)!r}; the fused path takes nf4"
    if len(getattr(qs, "shape", ())) != 2:
        return f"weight shape {tuple(qs.shape)} is not 2-D"
    return None


def _why_not_fusable(layer) -> Optional[str]:
    """The reason a PEFT LoRA layer cannot take the fused path, or None."""
    bnb4 = _bnb_linear4bit_class()
    if bnb4 is not None and type(layer.base_layer) is bnb4:
        why = _why_not_nf4(layer.base_layer)
        if why is not None:
            return f"base Linear4bit: {why}"
    elif type(layer.base_layer) is not nn.Linear:
        return f"base layer is {type(layer.base_layer).__name__}; the fused path takes nn.Linear and bitsandbytes' NF4 Linear4bit"
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


def _nf4_state_of(holder: nn.Module, base: nn.Module) -> tuple[torch.Tensor, "_nf4.QuantState"]:
    """(packed, QuantState) of a bitsandbytes Linear4bit, converted once and cached on `holder` for
    as long as the layer keeps the same quantization state object and bytes."""
    w = base.weight
    cached = getattr(holder, _NF4_CACHE, None)
    # Object identity, not data_ptr(): torch.compile traces identity checks, not pointer compares.
    if cached is not None and cached[0] is w.quant_state and cached[1] is w:
        return w.data, cached[2]
    packed, state = _bnb_weight(base)
    setattr(holder, _NF4_CACHE, (w.quant_state, w, state))
    return packed, state


def _fused_peft_forward(self, x, *args, **kwargs):
    """PEFT's LoRA layer forward, computed by lora_fused.lora_linear (nn.Linear base) or
    qlora_linear (NF4 Linear4bit base); anything outside the plain case (disabled or merged adapters,
    mixed-batch adapter_names, changed adapters) goes to PEFT's own."""
    original = getattr(self, _ORIGINAL_FORWARD)
    if args or kwargs or self.disable_adapters or self.merged or _why_not_fusable(self) is not None:
        return original(x, *args, **kwargs)
    name = next(a for a in self.active_adapters if a in self.lora_A)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    base = self.base_layer
    A, B = self.lora_A[name].weight, self.lora_B[name].weight
    if type(base) is nn.Linear:
        return lora_linear(x, base.weight, A, B, self.scaling[name], base.bias, dropout_p=p, training=self.training)
    # QLoRA: bitsandbytes computes in its compute_dtype and returns x's dtype; so does this.
    packed, state = _nf4_state_of(self, base)
    dt = base.compute_dtype or x.dtype
    bias = base.bias.to(dt) if base.bias is not None else None
    y = qlora_linear(x.to(dt), packed, state, A, B, self.scaling[name], bias, dropout_p=p, training=self.training)
    return y.to(x.dtype)


def _fused_bnb_module(module: nn.Module, targeted: bool, r: int, lora_alpha: float, lora_dropout: float) -> nn.Module:
    """NF4Linear over a bitsandbytes Linear4bit's bytes (QLoraLinear with a new adapter if targeted)."""
    if targeted:
        fused = QLoraLinear.from_bnb(module, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
    else:
        fused = NF4Linear.from_bnb(module)
    remember_original(fused, module)
    fused.train(module.training)
    return fused


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
    bnb_layers: bool = True,
) -> PatchReport:
    """Put the fused LoRA path into `model`, in place, and report what was fused and what was left.

    - PEFT LoRA layers on nn.Linear or on a bitsandbytes NF4 Linear4bit: their forward becomes
      lora_fused.lora_linear / qlora_linear over the SAME parameters and bytes (the active adapter).
    - Plain nn.Linear layers whose name is, or ends with, one of `target_modules` (as in PEFT's
      LoraConfig): replaced by LoraLinear(r, lora_alpha, lora_dropout) sharing the weight and bias;
      with quantize="nf4", by QLoraLinear (QLoRA: the weight quantized to NF4 with `blocksize` and
      `double_quant`, the 16-bit weight released; unpatch() gives back its dequantized copy).
    - bitsandbytes NF4 Linear4bit layers outside PEFT (with `bnb_layers`): NF4Linear over the same
      bytes, quantization state and bias, or QLoraLinear (a new adapter) when named by target_modules.
    """
    if quantize not in (None, "nf4"):
        raise ValueError(f"lora_fused.patch: quantize must be None or 'nf4'; got {quantize!r}")
    report = PatchReport()
    peft_classes = _peft_lora_classes()
    bnb4 = _bnb_linear4bit_class()
    targets = list(target_modules or [])
    peft_bases = {id(m.base_layer) for m in model.modules() if peft_classes and isinstance(m, peft_classes)}
    for name, module in list(model.named_modules()):
        if peft_classes and isinstance(module, peft_classes):
            if hasattr(module, _ORIGINAL_FORWARD):
                report.patched.append(name)
                continue
            why = _why_not_fusable(module)
            if why is not None:
                report.left[name] = why
                continue
            if type(module.base_layer) is not nn.Linear:
                _nf4_state_of(module, module.base_layer)  # converted now, not while torch.compile traces
            setattr(module, _ORIGINAL_FORWARD, module.forward)
            module.forward = types.MethodType(_fused_peft_forward, module)
            report.patched.append(name)
        elif id(module) in peft_bases:
            continue  # the base layer inside a PEFT layer: handled through the PEFT layer
        elif bnb_layers and bnb4 is not None and type(module) is bnb4:
            why = _why_not_nf4(module)
            if why is not None:
                report.left[name] = why
                continue
            fused = _fused_bnb_module(module, targets and _matches(name, targets), r, lora_alpha, lora_dropout)
            _set_submodule(model, name, fused)
            report.patched.append(name)
        elif targets and type(module) is nn.Linear and _matches(name, targets):
            if quantize == "nf4":
                fused = QLoraLinear.from_linear(
                    module, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, blocksize=blocksize, double_quant=double_quant
                )
                setattr(fused, _PATCHED_FROM_LINEAR, True)
            else:
                fused = LoraLinear.from_linear(module, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
                remember_original(fused, module)
            fused.train(module.training)
            _set_submodule(model, name, fused)
            report.patched.append(name)
    return report


def unpatch(model: nn.Module) -> list[str]:
    """Undo patch(): PEFT layers get their own forward back, LoraLinears from target_modules are
    replaced by the original nn.Linear (whose weight they shared), NF4Linear/QLoraLinear made from a
    bitsandbytes Linear4bit by that Linear4bit, QLoraLinears it quantized by an nn.Linear holding the
    dequantized weight (an adapter patch() added is dropped). Returns the names restored."""
    restored = []
    for name, module in list(model.named_modules()):
        if hasattr(module, _ORIGINAL_FORWARD):
            del module.forward  # drop the instance attribute: the class's forward is back
            delattr(module, _ORIGINAL_FORWARD)
            if hasattr(module, _NF4_CACHE):
                delattr(module, _NF4_CACHE)
            restored.append(name)
        elif isinstance(module, (LoraLinear, NF4Linear)) and hasattr(module, _ORIGINAL_MODULE):
            original = getattr(module, _ORIGINAL_MODULE)
            if isinstance(module, NF4Linear):  # a bitsandbytes layer: follow the model if it moved since
                original = original.to(module.weight.device)
            _set_submodule(model, name, original)
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
