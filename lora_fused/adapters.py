"""LoRA adapters in PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors`.

    lora_fused.save_adapter(model, "out/")     # PeftModel.from_pretrained(base, "out/") loads it
    lora_fused.load_adapter(model, "out/")     # an adapter PEFT saved, into lora_fused layers

Keys are PEFT's: `base_model.model.<module name>.lora_A.weight` / `.lora_B.weight`, module names
relative to the base model (the model lora_fused patched). The config names every adapted module
by its full name in `target_modules`, so PEFT wraps exactly those; ranks and alphas that differ
between layers go to `rank_pattern` / `alpha_pattern`, as PEFT writes them.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Optional, Union

import torch
from torch import nn

from .modules import LoraLinear, NF4Linear, QLoraLinear, _set_lora_hyperparameters

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KINDS = ("lora_A", "lora_B")


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - installed with transformers and peft
        raise ImportError("lora_fused: PEFT's adapter format needs safetensors (pip install safetensors)") from e
    return st


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoraLinear, QLoraLinear))}


def save_adapter(
    model: nn.Module,
    path: Union[str, os.PathLike],
    base_model_name_or_path: Optional[str] = None,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> list[str]:
    """Write the adapters of `model`'s LoraLinear / QLoraLinear layers to directory `path` in PEFT's
    format; returns the module names written. Merged layers are refused (their adapter is in W).
    `state_dict`: take the tensors from it (`<name>.lora_A`, `<name>.lora_B`) instead of the layers,
    e.g. the full state dict gathered from an FSDP2-sharded model."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("lora_fused.save_adapter: the model has no LoraLinear or QLoraLinear layer (patch it first)")
    merged = [n for n, m in layers.items() if getattr(m, "merged", False)]
    if merged:
        raise ValueError(f"lora_fused.save_adapter: unmerge() these layers first: {merged}")
    for hp in ("use_rslora", "lora_dropout"):
        values = {getattr(m, hp) for m in layers.values()}
        if len(values) > 1:
            raise ValueError(f"lora_fused.save_adapter: PEFT's format has one {hp} per adapter; the layers have {sorted(values)}")
    r = Counter(m.r for m in layers.values()).most_common(1)[0][0]
    alpha = Counter(m.lora_alpha for m in layers.values()).most_common(1)[0][0]
    first = next(iter(layers.values()))
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": first.lora_dropout,
        "use_rslora": first.use_rslora,
        "target_modules": sorted(layers),
        "rank_pattern": {n: m.r for n, m in layers.items() if m.r != r},
        "alpha_pattern": {n: m.lora_alpha for n, m in layers.items() if m.lora_alpha != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    tensors = {}
    for name, m in layers.items():
        for kind in _KINDS:
            t = state_dict[f"{name}.{kind}"] if state_dict is not None else getattr(m, kind)
            tensors[f"{_PREFIX}{name}.{kind}.weight"] = t.detach().contiguous().cpu()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    _safetensors().save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    return sorted(layers)


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rule: a pattern key matches a module whose name is the key or ends with '.' + key."""
    for key, value in pattern.items():
        if name == key or name.endswith("." + key):
            return value
    return default


def _check_config(config: dict, path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"lora_fused.load_adapter: {path} holds a {config.get('peft_type')} adapter; only LORA is supported")
    unsupported = {
        "use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out weights", "modules_to_save": "modules_to_save",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise ValueError(f"lora_fused.load_adapter: the adapter uses {what} ({key}={config[key]!r}); not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"lora_fused.load_adapter: the adapter trains biases (bias={config['bias']!r}); not supported")


def load_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> list[str]:
    """Load a PEFT LoRA adapter (directory with adapter_config.json and adapter_model.safetensors)
    into `model`, in place; returns the module names loaded. Each adapted module must be a
    LoraLinear / QLoraLinear (its lora_A / lora_B are overwritten in place, so optimizers keep
    them) or an nn.Linear / NF4Linear / bitsandbytes Linear4bit, which becomes one (as patch()
    makes it; unpatch() reverses it). r, alpha and rsLoRA come from the config."""
    from .patch import _set_submodule

    with open(os.path.join(path, CONFIG_NAME)) as f:
        config = json.load(f)
    _check_config(config, path)
    tensors = _safetensors().load_file(os.path.join(path, WEIGHTS_NAME))
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        body = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        module, kind, leaf = body.rsplit(".", 2) if body.count(".") >= 2 else (body, "", "")
        if kind not in _KINDS or leaf != "weight":
            raise ValueError(f"lora_fused.load_adapter: unsupported tensor {key!r} (only lora_A/lora_B weights of Linear layers)")
        by_module.setdefault(module, {})[kind] = t
    loaded = []
    for name in sorted(by_module):
        pair = by_module[name]
        if set(pair) != set(_KINDS):
            raise ValueError(f"lora_fused.load_adapter: {name} has {sorted(pair)}; expected lora_A and lora_B")
        A, B = pair["lora_A"], pair["lora_B"]
        r = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
            raise ValueError(f"lora_fused.load_adapter: {name}: lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)} do not have rank r={r}")
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"lora_fused.load_adapter: the adapter names module {name!r}, which the model does not have") from None
        if (layer.in_features, layer.out_features) != (A.shape[1], B.shape[0]):
            raise ValueError(
                f"lora_fused.load_adapter: {name} is {layer.in_features}->{layer.out_features}; the adapter is "
                f"{A.shape[1]}->{B.shape[0]}"
            )
        dropout, rslora = float(config.get("lora_dropout", 0.0)), bool(config.get("use_rslora", False))
        if not isinstance(layer, (LoraLinear, QLoraLinear)):
            layer = _adapted(layer, name, r, alpha, dropout, rslora)
            _set_submodule(model, name, layer)
        elif layer.r != r:  # a new rank: new adapter Parameters of that shape
            like = {"dtype": layer.lora_A.dtype, "device": layer.lora_A.device}
            layer.lora_A = nn.Parameter(torch.empty(r, layer.in_features, **like))
            layer.lora_B = nn.Parameter(torch.empty(layer.out_features, r, **like))
        _set_lora_hyperparameters(layer, r, alpha, dropout, rslora)
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        loaded.append(name)
    return loaded


def _adapted(layer: nn.Module, name: str, r: int, alpha: float, dropout: float, rslora: bool) -> nn.Module:
    """The LoraLinear / QLoraLinear that takes the adapter for `layer`, sharing its weights; unpatch()
    puts `layer` back."""
    from .patch import _ORIGINAL_MODULE, _bnb_linear4bit_class, _fused_bnb_module, remember_original

    bnb4 = _bnb_linear4bit_class()
    source = getattr(layer, _ORIGINAL_MODULE, layer) if type(layer) is NF4Linear else layer
    if type(source) is nn.Linear:
        new = LoraLinear.from_linear(source, r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora)
        remember_original(new, source)
    elif bnb4 is not None and type(source) is bnb4:
        new = _fused_bnb_module(source, True, r, alpha, dropout)  # load_adapter sets rsLoRA and scaling
    else:
        raise ValueError(
            f"lora_fused.load_adapter: {name} is a {type(layer).__name__}; adapters load into nn.Linear, "
            "bitsandbytes Linear4bit (or the NF4Linear patch() made of one), LoraLinear or QLoraLinear layers"
        )
    new.train(layer.training)
    return new
