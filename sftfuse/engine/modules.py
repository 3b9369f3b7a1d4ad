"""Modules: NF4Linear (a frozen 4-bit base) and LoRALinear (PEFT-compatible adapters over a 16-bit or NF4 base)."""

from __future__ import annotations

import math

import torch
from torch import nn

# =============================================================================================================
# NF4Linear
# =============================================================================================================


# =============================================================================================================
# LoRALinear
# =============================================================================================================


class LoRALinear(nn.Module):
    """PEFT-compatible LoRA adapter over a frozen `nn.Linear` or `NF4Linear`, computed by `lora_linear`.

    `lora_A` (r, in) and `lora_B` (out, r) have PEFT's shapes, so its `lora_A.weight` / `lora_B.weight` load
    without reshaping; scaling is lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`.
    """

    def __init__(self, base_layer: nn.Module, *, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r: expected a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: expected 0 <= p < 1, got {lora_dropout}")
        weight = getattr(base_layer, "weight", None)
        if not hasattr(base_layer, "quant") and not isinstance(weight, torch.Tensor):
            raise TypeError(f"base_layer: expected nn.Linear or NF4Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, lora_alpha, float(lora_dropout), use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        if dtype is None:  # the base's compute dtype: bf16 adapters on a bf16 base (PEFT would use fp32)
            dtype = base_layer.compute_dtype if hasattr(base_layer, "quant") else weight.dtype
        device = weight.device if isinstance(weight, torch.Tensor) else next(base_layer.buffers()).device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init: B = 0 makes the adapter start at 0

    @classmethod
    def from_linear(cls, base_layer: nn.Module, *, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> LoRALinear:
        """Wrap `base_layer` (frozen in place) with a fresh adapter of rank `r`."""
        return cls(base_layer, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)

    def _base(self):
        return self.base_layer.quant if hasattr(self.base_layer, "quant") else self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from sftfuse.engine.functions import lora_linear

        return lora_linear(x, self._base(), self.lora_A, self.lora_B, self.scaling, bias=self.base_layer.bias,
                           dropout=self.lora_dropout, training=self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}")
