"""nn.Modules that hold parameters and call lora_fused.functional."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from . import functional as LF
from . import _nf4_storage as _storage
from . import nf4 as _nf4


class LoraLinear(nn.Module):
    """A linear layer with a frozen weight and a LoRA adapter, PEFT's parameterisation:
    y = x W^T + b + scaling * dropout(x) A^T B^T, scaling = lora_alpha / r (lora_alpha / sqrt(r)
    with rsLoRA); A starts kaiming-uniform (or Gaussian with std 1/r), B at zero."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        init_lora_weights: Union[bool, str] = True,
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[torch.device, str]] = None,
        *,
        _weight: Optional[torch.Tensor] = None,
        _bias: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        _set_lora_hyperparameters(self, r, lora_alpha, lora_dropout, use_rslora)
        self.in_features, self.out_features = in_features, out_features
        factory = {"dtype": dtype, "device": device}
        if _weight is None:
            w = torch.empty(out_features, in_features, **factory)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            _weight = w
        self.weight = _weight if isinstance(_weight, nn.Parameter) else nn.Parameter(_weight, requires_grad=False)
        self.weight.requires_grad_(False)
        if _bias is not None:
            self.bias = _bias if isinstance(_bias, nn.Parameter) else nn.Parameter(_bias)
        elif bias:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            self.bias = nn.Parameter(torch.empty(out_features, **factory).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        lf = {"dtype": self.weight.dtype, "device": self.weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **lf))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **lf))
        self.reset_lora_parameters(init_lora_weights)
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, **kwargs) -> "LoraLinear":
        """Wrap an existing nn.Linear, reusing its weight and bias tensors (no copy)."""
        return cls(
            linear.in_features,
            linear.out_features,
            r=r,
            lora_alpha=lora_alpha,
            bias=linear.bias is not None,
            _weight=linear.weight,
            _bias=linear.bias,
            **kwargs,
        )

    def reset_lora_parameters(self, init_lora_weights: Union[bool, str] = True) -> None:
        with torch.no_grad():
            if init_lora_weights is False:
                return
            if init_lora_weights == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / self.r)
            elif init_lora_weights is True:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                raise ValueError(f"LoraLinear: init_lora_weights must be True, False or 'gaussian'; got {init_lora_weights!r}")
            nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, computed in fp32 and returned in the weight's dtype."""
        return (self.scaling * (self.lora_B.float() @ self.lora_A.float())).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the weight: the layer becomes one plain GEMM."""
        if self.merged:
            return
        self.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter again. Exact to the last bit in fp32 when the merge added no
        rounding; in bf16 the weight may differ by up to one rounding of the merged weight."""
        if not self.merged:
            return
        self.weight.sub_(self.delta_weight())
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        return LF.lora_linear(
            x, self.weight, self.lora_A, self.lora_B, self.scaling, self.bias, self.lora_dropout, self.training
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, bias={self.bias is not None}"
        )


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4 (bitsandbytes' Linear4bit format): y = x dequant(W)^T + b,
    computed in `compute_dtype` without ever making a 16-bit copy of W.

    `weight` is the packed uint8 tensor [(N*K+1)//2, 1] (a Parameter with requires_grad=False, as
    bitsandbytes keeps it); the quantization state lives in `nf4_state` (see _nf4_storage: laid out so
    that DDP, FSDP2 and torch.distributed.checkpoint shard, move and save it). The state dict has
    bitsandbytes' keys (`weight`, `weight.absmax`, `weight.quant_map`,
    `weight.nested_absmax`, `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`, `bias`),
    so it loads into a `bitsandbytes.nn.Linear4bit` and takes one from it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        blocksize: int = 64,
        double_quant: bool = True,
        device: Optional[Union[torch.device, str]] = None,
        *,
        _weight: Optional[torch.Tensor] = None,
        _bias: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"{type(self).__name__}: compute_dtype must be bfloat16, float16 or float32; got {compute_dtype}")
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        if _weight is None:
            _weight = torch.empty(out_features, in_features, device=device, dtype=compute_dtype)
            nn.init.kaiming_uniform_(_weight, a=math.sqrt(5))
        if tuple(_weight.shape) != (out_features, in_features):
            raise ValueError(f"{type(self).__name__}: weight must be [{out_features}, {in_features}]; got {tuple(_weight.shape)}")
        packed, state = _nf4.quantize(_weight.detach(), blocksize=blocksize, double_quant=double_quant)
        self._set_quantized(packed, state)
        if _bias is not None:
            self.bias = _bias if isinstance(_bias, nn.Parameter) else nn.Parameter(_bias)
        elif bias:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=compute_dtype).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, blocksize: int = 64, compute_dtype: Optional[torch.dtype] = None, double_quant: bool = True
    ) -> "NF4Linear":
        """Quantize an nn.Linear's weight to NF4 (its bias is reused as is)."""
        dt = _compute_dtype_for(linear, compute_dtype)
        return cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=dt, blocksize=blocksize,
            double_quant=double_quant, device=linear.weight.device, _weight=linear.weight, _bias=linear.bias,
        )

    @classmethod
    def from_bnb(cls, layer: nn.Module) -> "NF4Linear":
        """Take a bitsandbytes Linear4bit (nf4) as it is: same packed bytes, quantization state and
        bias Parameter, no requantization."""
        packed, state = _bnb_weight(layer)
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj.in_features, obj.out_features = layer.in_features, layer.out_features
        obj.compute_dtype = getattr(layer, "compute_dtype", None) or state.dtype
        obj._set_quantized(packed, state)
        obj.bias = layer.bias
        return obj

    def _set_quantized(self, packed: torch.Tensor, state: "_nf4.QuantState") -> None:
        if state.quant_type != "nf4" or len(state.shape) != 2:
            raise ValueError(f"{type(self).__name__}: need a 2-D NF4 weight; got {state.quant_type} of shape {tuple(state.shape)}")
        state.validate()
        self.weight = nn.Parameter(packed.detach(), requires_grad=False)
        setattr(self, _storage.HOLDER, _storage.NF4StateHolder(state))
        self._set_quant_metadata(state)

    def _set_quant_metadata(self, state: "_nf4.QuantState") -> None:
        self.blocksize, self.quant_dtype, self.nf4_offset = state.blocksize, state.dtype, state.offset
        self.nested_blocksize = state.state2.blocksize if state.state2 is not None else _nf4.NESTED_BLOCKSIZE

    def _fqn_modifiers(self) -> dict[str, str]:
        # torch.distributed.checkpoint: `weight.absmax` & co. live under `nf4_state.weight` (see _nf4_storage).
        return {"weight": _storage.HOLDER}

    @property
    def _stored_state(self) -> "_storage.NF4QuantState":
        return getattr(self, _storage.HOLDER).weight

    @property
    def quant_state(self) -> "_nf4.QuantState":
        s = self._stored_state
        # Rebuilt only when a stored tensor or the metadata changed (load_state_dict, FSDP, .to()):
        # building it costs the host ~25 us, a noticeable share of a forward at small M.
        key = (s.absmax, s.nested_absmax, s.quant_map, s.nested_quant_map, self.blocksize, self.nested_blocksize,
               self.quant_dtype, self.nf4_offset)
        cached = self.__dict__.get("_quant_state_cache")
        if cached is not None and all(a is b for a, b in zip(cached[0], key)):
            return cached[1]
        nested = s.nested_absmax is not None
        absmax = _storage.as_uint8(s.absmax) if nested else s.absmax
        s2 = _nf4.NestedState(absmax=s.nested_absmax, code=s.nested_quant_map, blocksize=self.nested_blocksize) if nested else None
        state = _nf4.QuantState(
            absmax=absmax, shape=torch.Size((self.out_features, self.in_features)), code=s.quant_map,
            blocksize=self.blocksize, dtype=self.quant_dtype, offset=self.nf4_offset, state2=s2,
        )
        if absmax is s.absmax:  # not a uint8 copy of an FSDP-cast parameter, which would go stale
            self.__dict__["_quant_state_cache"] = (key, state)
        return state

    @property
    def packed_weight(self) -> torch.Tensor:
        """The packed NF4 bytes as the kernels take them (uint8 even if FSDP cast the all-gather)."""
        return _storage.as_uint8(self.weight)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return _nf4.dequantize(self.packed_weight, self.quant_state, dtype or self.compute_dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        s = self._stored_state
        nested = s.nested_absmax is not None
        entries = {"absmax": s.absmax, "quant_map": s.quant_map}
        if nested:
            entries.update(nested_absmax=s.nested_absmax, nested_quant_map=s.nested_quant_map)
        entries[_nf4.QS_KEY] = getattr(s.quant_state, _storage.JSON_KEY)
        for k, v in entries.items():
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        qs_prefix = prefix + "weight."
        qs = {k[len(qs_prefix):]: state_dict[k] for k in list(state_dict) if k.startswith(qs_prefix)}
        own = {k: v for k, v in state_dict.items() if not k.startswith(qs_prefix)}
        if qs:
            try:
                self._load_nf4_state(qs, own.get(prefix + "weight"), bool(local_metadata.get("assign_to_params_buffers")))
            except (ValueError, RuntimeError) as e:
                error_msgs.append(f"{type(self).__name__} at {prefix!r}: cannot load the NF4 state: {e}")
                return
        elif strict:
            missing_keys.extend(qs_prefix + k for k in ("absmax", "quant_map", _nf4.QS_KEY))
        super()._load_from_state_dict(own, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    @torch.no_grad()
    def _load_nf4_state(self, qs: dict, packed: Optional[torch.Tensor], assign: bool) -> None:
        """Copy bitsandbytes' `weight.*` entries into the stored state (in place, so optimizers and
        FSDP keep their tensors; DTensor entries into sharded parameters). A state of another layout
        (blocksize, double quantization) replaces the stored one, which a sharded layer cannot do."""
        state = _nf4.QuantState.from_dict(qs, device=self._stored_state.quant_map.device)
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"the state is for a weight of shape {tuple(state.shape)}")
        s = self._stored_state
        sharded = hasattr(s.absmax, "placements") or hasattr(self.weight, "placements")  # DTensors under FSDP2
        same_layout = (
            state.blocksize == self.blocksize and state.nested == (s.nested_absmax is not None)
            and (not state.nested or state.state2.blocksize == self.nested_blocksize)
        )
        if not same_layout:
            if sharded:
                raise ValueError(
                    f"a sharded layer keeps its layout (blocksize {self.blocksize}, double_quant "
                    f"{s.nested_absmax is not None}); the state has blocksize {state.blocksize}, double_quant {state.nested}"
                )
            if packed is None:
                raise ValueError("the state has another layout, so it needs its packed `weight` too")
            self._set_quantized(packed.to(self.weight.device), state)
            return
        if assign and isinstance(s.absmax, nn.Parameter):
            s.absmax = nn.Parameter(state.absmax, requires_grad=False)
        elif assign:
            s.absmax = state.absmax
        else:
            s.absmax.copy_(state.absmax)
        s.quant_map.copy_(state.code)
        if state.nested:
            s.nested_absmax.copy_(state.state2.absmax)
            s.nested_quant_map.copy_(state.state2.code)
        setattr(s.quant_state, _storage.JSON_KEY, _storage.padded_json(qs[_nf4.QS_KEY].cpu()).to(s.quant_map.device))
        self._set_quant_metadata(state)

    def _nf4_input(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        return x.to(self.compute_dtype), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc, bias = self._nf4_input(x)
        return LF.nf4_linear(xc, self.packed_weight, self.quant_state, bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"compute_dtype={self.compute_dtype}, blocksize={self.blocksize}, double_quant={self._stored_state.nested_absmax is not None}"
        )


class QLoraLinear(NF4Linear):
    """An NF4 base (as NF4Linear) with a LoRA adapter, PEFT's parameterisation (as LoraLinear):
    y = x dequant(W)^T + b + scaling * dropout(x) A^T B^T. Parameters `lora_A` [r, K], `lora_B` [N, r]
    (in `lora_dtype`, default the compute dtype), `bias`; the base is frozen."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        init_lora_weights: Union[bool, str] = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        blocksize: int = 64,
        double_quant: bool = True,
        lora_dtype: Optional[torch.dtype] = None,
        device: Optional[Union[torch.device, str]] = None,
        *,
        _weight: Optional[torch.Tensor] = None,
        _bias: Optional[torch.Tensor] = None,
    ):
        super().__init__(
            in_features, out_features, bias=bias, compute_dtype=compute_dtype, blocksize=blocksize,
            double_quant=double_quant, device=device, _weight=_weight, _bias=_bias,
        )
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_dtype)

    def _init_lora(self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_dtype) -> None:
        _set_lora_hyperparameters(self, r, lora_alpha, lora_dropout, use_rslora)
        lf = {"dtype": lora_dtype or self.compute_dtype, "device": self.weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **lf))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **lf))
        LoraLinear.reset_lora_parameters(self, init_lora_weights)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, blocksize: int = 64,
                    compute_dtype: Optional[torch.dtype] = None, double_quant: bool = True, **lora_kwargs) -> "QLoraLinear":
        """Quantize an nn.Linear's weight to NF4 and add a LoRA adapter (its bias is reused)."""
        dt = _compute_dtype_for(linear, compute_dtype)
        return cls(
            linear.in_features, linear.out_features, r=r, lora_alpha=lora_alpha, bias=linear.bias is not None,
            compute_dtype=dt, blocksize=blocksize, double_quant=double_quant, device=linear.weight.device,
            _weight=linear.weight, _bias=linear.bias, **lora_kwargs,
        )

    @classmethod
    def from_bnb(cls, layer: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: Union[bool, str] = True,
                 lora_dtype: Optional[torch.dtype] = None) -> "QLoraLinear":
        """A bitsandbytes Linear4bit (nf4) as the base, as it is, with a new LoRA adapter."""
        obj = super().from_bnb(layer)
        obj._init_lora(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_dtype)
        return obj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc, bias = self._nf4_input(x)
        y = LF.qlora_linear(
            xc, self.packed_weight, self.quant_state, self.lora_A, self.lora_B, self.scaling, bias, self.lora_dropout, self.training
        )
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}"


def _set_lora_hyperparameters(module: nn.Module, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool) -> None:
    """r, lora_alpha, lora_dropout, use_rslora and PEFT's scaling (alpha / r, alpha / sqrt(r) with rsLoRA)."""
    name = type(module).__name__
    if r < 1:
        raise ValueError(f"{name}: r must be at least 1; got {r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"{name}: lora_dropout must be in [0, 1); got {lora_dropout}")
    module.r, module.lora_alpha, module.lora_dropout, module.use_rslora = r, lora_alpha, lora_dropout, use_rslora
    module.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _compute_dtype_for(linear: nn.Linear, compute_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The compute dtype asked for, else the linear's own 16-bit dtype, else bf16."""
    if compute_dtype is not None:
        return compute_dtype
    return linear.weight.dtype if linear.weight.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def _bnb_weight(layer: nn.Module) -> tuple[torch.Tensor, "_nf4.QuantState"]:
    """(packed, QuantState) of a bitsandbytes Linear4bit, through its own state dict entries."""
    w = getattr(layer, "weight", None)
    qs = getattr(w, "quant_state", None)
    if qs is None:
        raise ValueError(
            f"expected a quantized bitsandbytes Linear4bit (weight.quant_state set: move it to its device first); "
            f"got {type(layer).__name__}"
        )
    if getattr(qs, "quant_type", None) != "nf4":
        raise ValueError(f"only NF4 Linear4bit layers are supported; got quant_type {getattr(qs, 'quant_type', None)!r}")
    state = _nf4.QuantState.from_dict(qs.as_dict(packed=True), device=w.device)
    return w.data, state
