"""TEMPORARY stand-ins for pieces other helpers are building (remove once they land in main).

`install()` fills `sftfuse.engine.modules.LoRALinear` with a minimal PEFT-like module only when the real one is
missing, so the trainer's tests can run before issue 5 lands. It is never imported by shipped code.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _StandInLoRALinear(nn.Module):
    def __init__(self, base_layer, r, lora_alpha, lora_dropout, use_rslora):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, lora_alpha, lora_dropout, use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        w = base_layer.weight
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, base_layer, *, r=16, lora_alpha=32, lora_dropout=0.0, use_rslora=False):
        return cls(base_layer, r, lora_alpha, lora_dropout, use_rslora)

    def forward(self, x):
        h = nn.functional.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        return self.base_layer(x) + (h @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


def install() -> None:
    import sftfuse.engine.modules as modules

    if not hasattr(modules, "LoRALinear"):
        modules.LoRALinear = _StandInLoRALinear
