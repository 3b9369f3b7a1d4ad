"""The per-module swaps `sftfuse.patch.patcher` applies besides the loss: 4-bit linears, PEFT LoRA linears, gated
MLPs, RMSNorms and sdpa attention. Each is a matcher, a check (a reason to leave the module alone, or None) and a
per-instance forward `impl(module, original, state, *args, **kwargs)` that falls back to `original` whenever the
module is no longer in the state it was checked in. The patcher's module docstring describes each swap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from sftfuse.patch.families import family_class_of, loaded_classes

# =============================================================================================================
# 4-bit bases: bitsandbytes Linear4bit and sftfuse NF4Linear
# =============================================================================================================


# Every module is matched by class (isinstance); a library's classes are looked up only once it is imported.


def _is_bnb_4bit(module: nn.Module) -> bool:
    return isinstance(module, loaded_classes("bitsandbytes.nn.modules", "Linear4bit"))


def _is_nf4_linear(module: nn.Module) -> bool:
    from sftfuse.modules.linear import NF4Linear

    return isinstance(module, NF4Linear)


def _is_lora_linear(module: nn.Module) -> bool:
    from sftfuse.modules.linear import LoRALinear

    return isinstance(module, LoRALinear)


def _bnb_nf4_weight(module: nn.Module):
    """A zero-copy NF4Weight view of a bitsandbytes Linear4bit's packed weight and quant state."""
    from sftfuse.modules.quantize import nf4_weight_from_bnb

    return nf4_weight_from_bnb(module.weight)


def _check_nf4(module: nn.Module) -> str | None:
    qs = getattr(module.weight, "quant_state", None)
    if qs is None:
        return "not quantized yet (no quant_state: move it to its device first)"
    if getattr(qs, "quant_type", "nf4") != "nf4":
        return f"quant_type {qs.quant_type!r}: only nf4 is fused"
    return None


def _nf4_forward(module, original, state, x, *args, **kwargs):
    if args or kwargs or _check_nf4(module) is not None:
        return original(x, *args, **kwargs)
    from sftfuse.ops import nf4 as nf4_op  # looked up per call: tests count the calls

    q = _bnb_nf4_weight(module)
    bias = None if module.bias is None else module.bias.to(q.dtype)
    return nf4_op.nf4_matmul(x.to(q.dtype), q, bias).to(x.dtype)


# =============================================================================================================
# PEFT LoRA linears
# =============================================================================================================


def _is_peft_lora_linear(module: nn.Module) -> bool:
    classes = loaded_classes("peft.tuners.lora.layer", "Linear") + loaded_classes("peft.tuners.lora.bnb", "Linear4bit")
    return isinstance(module, classes) and hasattr(module, "lora_A") and hasattr(module, "get_base_layer")


def _check_lora(module: nn.Module) -> str | None:
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters: only one is fused"
    name = active[0]
    if name in getattr(module, "lora_variant", {}):
        return f"LoRA variant {type(module.lora_variant[name]).__name__} (e.g. DoRA) is left to PEFT"
    # DoRA by its magnitude vector too: PEFT < 0.15 marked it with `use_dora` alone, and fused as plain LoRA it
    # would silently drop the m / ||W + s B A|| row scale (issue 19; tests/patch/test_dora.py)
    use_dora = getattr(module, "use_dora", None)
    if name in getattr(module, "lora_magnitude_vector", {}) or (isinstance(use_dora, dict) and use_dora.get(name)):
        return "DoRA (magnitude-scaled update) is left to PEFT"
    if getattr(module, "lora_bias", {}).get(name) or module.lora_B[name].bias is not None:
        return "lora_bias is left to PEFT"
    if module.merged:
        return "adapter merged into the base weight"
    if module.disable_adapters:
        return "adapters disabled"
    base = module.get_base_layer()
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out (Conv1D) base"
    if _is_bnb_4bit(base):
        return _check_nf4(base)
    if type(base) is not nn.Linear and not _is_nf4_linear(base):
        return f"base layer {type(base).__name__} is not an nn.Linear, NF4 Linear4bit or NF4Linear"
    return None


def _lora_parts(module: nn.Module):
    """(base weight or NF4Weight, lora_A, lora_B, scaling, bias, dropout p, compute dtype) of a PEFT LoRA linear
    that passes `_check_lora`, or of an sftfuse LoRALinear."""
    if _is_lora_linear(module):
        base = module.base_layer
        nf4 = hasattr(base, "quant")
        return (module._base(), module.lora_A, module.lora_B, module.scaling, base.bias, module.lora_dropout,
                base.compute_dtype if nf4 else base.weight.dtype)
    name = module.active_adapters[0]
    base = module.get_base_layer()
    if _is_bnb_4bit(base):
        weight, compute = _bnb_nf4_weight(base), None
    elif _is_nf4_linear(base):
        weight, compute = base.quant, base.compute_dtype
    else:
        weight, compute = base.weight, base.weight.dtype
    dropout = module.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    return (weight, module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name]), base.bias,
            p, compute or weight.dtype)


def _lora_forward(module, original, state, x, *args, **kwargs):
    # Anything switched on after patching (adapter_names, a second adapter, merge, disable) goes back to PEFT.
    if args or kwargs or _check_lora(module) is not None:
        return original(x, *args, **kwargs)
    from sftfuse.ops import lora as lora_op

    weight, A, B, scaling, bias, p, dtype = _lora_parts(module)
    # lora_linear computes the adapter in x's dtype and returns its gradients in the adapters' own (fp32) dtype
    y = lora_op.lora_linear(x.to(dtype), weight, A, B, scaling, bias=bias, dropout=p, training=module.training)
    return y.to(x.dtype)


# =============================================================================================================
# Gated MLPs whose three projections are LoRA linears, and RMSNorms
# =============================================================================================================

_ACTS = {"SiLU": "silu", "SiLUActivation": "silu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh"}
_PROJ = ("gate_proj", "up_proj", "down_proj")


def _is_gated_mlp(module: nn.Module) -> bool:
    return family_class_of(module, "mlp_class") is not None and all(hasattr(module, n) for n in (*_PROJ, "act_fn"))


def _mlp_parts(module: nn.Module) -> tuple[str | None, list]:
    """(reason to leave the MLP alone or None, `_lora_parts` of gate, up and down): one pass serves both the
    check and the forward, which runs it on every call (adapters may be switched off after patching)."""
    act = type(module.act_fn).__name__
    if act not in _ACTS:
        return f"activation {act} is not fused (SiLU and tanh-GELU are)", []
    parts = []
    for name in _PROJ:
        proj = getattr(module, name)
        if _is_peft_lora_linear(proj):
            reason = _check_lora(proj)
            if reason is not None:
                return f"{name}: {reason}", []
        elif not _is_lora_linear(proj):
            return f"{name} is a {type(proj).__name__}, not a LoRA linear", []
        parts.append(_lora_parts(proj))
        if parts[-1][4] is not None:
            return f"{name} has a bias", []
    dtypes = {part[-1] for part in parts}
    if len(dtypes) != 1:
        return f"projections compute in different dtypes {sorted(map(str, dtypes))}", []
    return None, parts


def _check_mlp(module: nn.Module) -> str | None:
    return _mlp_parts(module)[0]


def _mlp_forward(module, original, state, x, *args, **kwargs):
    # Without autograd (eval, generate) the fused block saves nothing worth saving: the original runs.
    if args or kwargs or not torch.is_grad_enabled():
        return original(x, *args, **kwargs)
    reason, parts = _mlp_parts(module)
    if reason is not None:
        return original(x, *args, **kwargs)
    from sftfuse.kernels.nf4 import NF4Weight
    from sftfuse.ops import lora_mlp as mlp_op

    dtype = parts[0][-1]
    recompute = state.get("recompute", "auto")
    if recompute == "auto":  # QLoRA (4-bit bases): memory first, recompute gate and up; 16-bit: keep their outputs
        recompute = all(isinstance(w, NF4Weight) for w, *_ in parts)
    gate, up, down = ((w, A, B, s, p) for w, A, B, s, _, p, _ in parts)
    y = mlp_op.lora_mlp(x.to(dtype), gate, up, down, act=_ACTS[type(module.act_fn).__name__],
                           training=module.training, recompute=recompute)
    return y.to(x.dtype)


def _is_rms_norm(module: nn.Module) -> bool:
    return family_class_of(module, "norm_class") is not None and isinstance(getattr(module, "weight", None),
                                                                             torch.Tensor)


def _norm_eps(module: nn.Module) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return None if eps is None else float(eps)


def _check_norm(module: nn.Module) -> str | None:
    if module.weight.dim() != 1:
        return f"weight of shape {tuple(module.weight.shape)}, expected 1-D"
    if _norm_eps(module) is None:
        return "no variance_epsilon or eps attribute"
    return None


def _norm_forward(module, original, state, x, *args, **kwargs):
    if args or kwargs or not torch.is_grad_enabled() or x.shape[-1:] != module.weight.shape:
        return original(x, *args, **kwargs)
    from sftfuse.ops import rms_norm as norm_op

    return norm_op.rms_norm(x, module.weight, _norm_eps(module), state["rule"])


class _WideSdpa(TorchFunctionMode):
    """Answers torch's scaled_dot_product_attention with sftfuse's inside one module's call; passes the rest."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            from sftfuse.ops import attention as attention_op

            return attention_op.scaled_dot_product_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _is_attention(module: nn.Module) -> bool:
    return family_class_of(module, "attn_class") is not None


def _check_attention(module: nn.Module) -> str | None:
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if impl != "sdpa":
        return f"attention implementation {impl!r}: only sdpa's is swapped"
    return None


def _attention_forward(module, original, state, *args, **kwargs):
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not torch.is_grad_enabled() or not isinstance(hidden, torch.Tensor) or hidden.device.type != "cpu":
        return original(*args, **kwargs)
    with _WideSdpa():
        return original(*args, **kwargs)


# =============================================================================================================
# the table (patcher.py puts the loss swap first)
# =============================================================================================================


@dataclass(frozen=True)
class Swap:
    """One row of the patcher's table: a module kind, how to match and check it, and its per-instance forward."""

    kind: str  # the patch_model flag that enables it
    match: Callable[[nn.Module], bool]
    check: Callable[[nn.Module, bool], str | None]  # (module, strict) -> reason to leave it alone, or None
    impl: Callable | None  # per-instance forward; None: native sftfuse module, nothing to swap
    op: str
    state: Callable[[nn.Module, dict], dict] | None = None  # (module, patch_model's options) -> the impl's state


# Tried in order; the first row whose match accepts a module decides for it (these matchers do not overlap).
SWAPS = (
    Swap("mlp", _is_gated_mlp, lambda m, strict: _check_mlp(m), _mlp_forward, "lora_mlp",
         lambda m, opts: {"recompute": {"recompute": True, "save": False}.get(opts["mlp"], "auto")}),
    Swap("rms_norm", _is_rms_norm, lambda m, strict: _check_norm(m), _norm_forward, "rms_norm",
         lambda m, opts: {"rule": family_class_of(m, "norm_class").norm_rule}),
    Swap("attention", _is_attention, lambda m, strict: _check_attention(m), _attention_forward,
         "scaled_dot_product_attention (CPU dtype: see the CPU plan)"),
    Swap("lora", _is_peft_lora_linear, lambda m, strict: _check_lora(m), _lora_forward, "lora_linear"),
    Swap("lora", _is_lora_linear, lambda m, s: None, None, "lora_linear (native)"),
    Swap("nf4", _is_bnb_4bit, lambda m, strict: _check_nf4(m), _nf4_forward, "nf4_matmul"),
    Swap("nf4", _is_nf4_linear, lambda m, s: None, None, "nf4_matmul (native)"),
)
