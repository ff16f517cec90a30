"""nn.Modules that hold parameters and call lora_fused.functional."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from . import functional as LF


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
        if r < 1:
            raise ValueError(f"LoraLinear: r must be at least 1; got {r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"LoraLinear: lora_dropout must be in [0, 1); got {lora_dropout}")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lora_alpha, self.lora_dropout, self.use_rslora = lora_alpha, lora_dropout, use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
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
