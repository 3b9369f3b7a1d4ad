"""Modules: NF4Linear (a frozen 4-bit base) and LoRALinear (PEFT-compatible adapters over a 16-bit or NF4 base)."""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from sftfuse.kernels.nf4 import NESTED_BLOCKSIZE, NF4Weight, dequantize_nf4, dynamic_map, nf4_code, quantize_nf4
from sftfuse.ops.nf4 import nf4_matmul

# =============================================================================================================
# NF4Linear
# =============================================================================================================


_QUANT_FLOATS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NF4Linear(nn.Linear):
    """A frozen linear layer whose weight is stored in NF4 (bitsandbytes' format): y = x @ dequant(W)^T + b.

    It subclasses `nn.Linear` (as bitsandbytes' Linear4bit does) so that what recognises linear layers by class
    recognises it: PEFT's `get_peft_model` with a plain `LoraConfig` (target names or "all-linear") wraps it in
    PEFT's LoRA `Linear`, whose forward is `base(x) + lora(x)`. `nn.Linear.__init__` is not run: `weight` is the
    packed uint8 buffer ((out*in+1)//2, 1), never a float parameter, so code that would use it as the float
    (out, in) weight (PEFT's merge, DoRA's weight norm) fails on its dtype or shape (for any layer of more than 2
    inputs) instead of computing on packed bytes.

    The NF4 tensors are buffers (`weight` = packed bytes ((out*in+1)//2, 1), `absmax`, `quant_map`,
    `nested_absmax`, `nested_quant_map`), so `.to()` moves them; the state dict uses bitsandbytes' keys
    (`weight`, `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
    `weight.quant_state.bitsandbytes__nf4`), so a transformers + bitsandbytes 4-bit checkpoint loads into it and
    what it saves loads back into bitsandbytes. The input is cast to `compute_dtype`, the output back to the
    input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16, device=None):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a float (out, in) weight
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        n, nb = in_features * out_features, -(-in_features * out_features // blocksize)
        self._set_quant(NF4Weight(  # placeholder bytes of the right shapes, overwritten by loading or quantizing
            torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device),
            torch.zeros(nb, dtype=torch.uint8 if double_quant else torch.float32, device=device),
            torch.zeros(-(-nb // NESTED_BLOCKSIZE), device=device) if double_quant else None,
            dynamic_map().to(device, copy=True) if double_quant else None, 0.0, nf4_code(device), blocksize,
            (out_features, in_features), compute_dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    def _set_quant(self, q: NF4Weight) -> None:
        if q.shape != (self.out_features, self.in_features):
            raise ValueError(f"quant: shape {q.shape} != ({self.out_features}, {self.in_features})")
        self.register_buffer("weight", q.packed.reshape(-1, 1))
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("quant_map", q.code)
        self.register_buffer("nested_absmax", q.nested_absmax)
        self.register_buffer("nested_quant_map", q.nested_code)
        self.offset, self.blocksize, self.weight_dtype = float(q.offset), q.blocksize, q.dtype

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must move the fp32 quant state but never round it: keep its dtype. The compute
        # dtype follows a float cast (as an nn.Linear's follows its weight's): model.to(bf16) computes in bf16.
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        keep = {n: self._buffers[n] for n in _QUANT_FLOATS if self._buffers.get(n) is not None
                and self._buffers[n].is_floating_point()}
        super()._apply(fn, recurse)
        for name, t in keep.items():
            if self._buffers[name].dtype != t.dtype:
                self._buffers[name] = t.to(self._buffers[name].device)
        return self

    @property
    def quant(self) -> NF4Weight:
        """The NF4Weight viewing this module's current buffers (no copy)."""
        return NF4Weight(self.weight.view(-1), self.absmax, self.nested_absmax, self.nested_quant_map, self.offset,
                         self.quant_map, self.blocksize, (self.out_features, self.in_features), self.weight_dtype)

    @classmethod
    def from_quant(cls, q: NF4Weight, bias: torch.Tensor | None = None, *,
                   compute_dtype: torch.dtype = torch.bfloat16) -> NF4Linear:
        """Wrap an existing NF4Weight (no copy) and an optional bias (out,)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.out_features, m.in_features = q.shape
        m.compute_dtype = compute_dtype
        m._set_quant(q)
        m.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16) -> NF4Linear:
        """Quantize `linear`'s weight (out, in) to NF4; the bias is kept, frozen, in `compute_dtype`."""
        if not isinstance(linear, nn.Linear) or isinstance(linear, NF4Linear):  # an NF4Linear is quantized already
            raise TypeError(f"linear: expected a 16/32-bit nn.Linear, got {type(linear).__name__}")
        q = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        bias = None if linear.bias is None else linear.bias.detach().to(compute_dtype)
        return cls.from_quant(q, bias, compute_dtype=compute_dtype)

    def dequantize(self) -> torch.Tensor:
        """The dequantized weight (out, in) in `compute_dtype`."""
        return dequantize_nf4(self.quant, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_matmul(x.to(self.compute_dtype), self.quant, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.nested_absmax is not None}, "
                f"compute_dtype={self.compute_dtype}")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # bitsandbytes' layout: the quant state hangs under `weight.`, its scalars packed as JSON bytes
        w = "weight."
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination[prefix + w + "absmax"] = self.absmax
        destination[prefix + w + "quant_map"] = self.quant_map
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _dtype_name(self.weight_dtype),
                "shape": [self.out_features, self.in_features]}
        if self.nested_absmax is not None:
            destination[prefix + w + "nested_absmax"] = self.nested_absmax
            destination[prefix + w + "nested_quant_map"] = self.nested_quant_map
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset)
        destination[prefix + w + "quant_state.bitsandbytes__nf4"] = torch.tensor(
            list(json.dumps(meta).encode()), dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight.quant_state.bitsandbytes__nf4"
        if key not in state_dict:
            missing_keys.append(key)
            return
        try:
            q = nf4_from_state_dict(state_dict, prefix + "weight", device=self.weight.device)
            self._set_quant(q)
        except (ValueError, KeyError) as e:
            error_msgs.append(f"{prefix}: {e}")
            return
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
            else:
                missing_keys.append(prefix + "bias")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def nf4_from_state_dict(state_dict: dict, key: str, *, device=None) -> NF4Weight:
    """The NF4Weight stored under `key` (e.g. 'model.layers.0.mlp.up_proj.weight') in bitsandbytes' keys."""
    meta = json.loads(bytes(state_dict[key + ".quant_state.bitsandbytes__nf4"].tolist()).decode())
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"{key}: quant_type={meta.get('quant_type')!r}, only 'nf4' is supported")
    nested = key + ".nested_absmax" in state_dict
    if nested and meta.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE:
        raise ValueError(f"{key}: nested_blocksize={meta['nested_blocksize']}, expected {NESTED_BLOCKSIZE}")
    mv = (lambda t: t.to(device) if device is not None else t)
    return NF4Weight(
        mv(state_dict[key]).reshape(-1).view(torch.uint8), mv(state_dict[key + ".absmax"]),
        mv(state_dict[key + ".nested_absmax"]).float() if nested else None,
        mv(state_dict[key + ".nested_quant_map"]).float() if nested else None,
        float(meta.get("nested_offset", 0.0)), mv(state_dict[key + ".quant_map"]).float(), int(meta["blocksize"]),
        (int(meta["shape"][0]), int(meta["shape"][1])), _DTYPES.get(meta.get("dtype"), torch.bfloat16))



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
        from sftfuse.ops.lora import lora_linear

        if hasattr(self.base_layer, "quant"):  # NF4 base: compute in its compute dtype, like NF4Linear
            y = lora_linear(x.to(self.base_layer.compute_dtype), self._base(), self.lora_A, self.lora_B,
                            self.scaling, bias=self.base_layer.bias, dropout=self.lora_dropout, training=self.training)
            return y.to(x.dtype)
        return lora_linear(x, self._base(), self.lora_A, self.lora_B, self.scaling, bias=self.base_layer.bias,
                           dropout=self.lora_dropout, training=self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}")
