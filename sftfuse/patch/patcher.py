"""patch_model / unpatch_model: swap sftfuse's fused ops into one Hugging Face model instance, and back out.

One walk over `model.named_modules()` meets each module once; the first row of `_SWAPS` (a declarative table)
whose `match` accepts the module either swaps it or records why it was left alone. A swap replaces only that
*instance's* `forward` with a `_Forward` callable that keeps the forward it replaced; nothing global is touched
(no `torch.nn.functional`, no transformers class, nothing at import), so two models in one process can be patched
differently and `unpatch_model` restores the exact previous `forward` of every instance. `_Forward` carries the
original signature (`__signature__`), because HF Trainer, TRL and `generate()` inspect `model.forward`.

The swaps (the loss swap here, the others and their table rows in `sftfuse.patch.swaps`):
- loss: a `*ForCausalLM` of a family in `sftfuse.patch.families.FAMILIES`. Called in training mode with
  `labels`, the patched forward runs the family's own decoder with the same arguments and calls the lm_head
  *module* on the last hidden state; the head (patched too) returns `linear_cross_entropy(hidden, head.weight,
  labels, shift_labels=True, softcap=, logit_scale=, num_items_in_batch=)`, so the output has `loss` and
  `logits=None`. That loss is HF's `ForCausalLMLoss`: labels shifted left (or HF's pre-shifted `shift_labels`),
  -100 ignored, mean over labelled tokens or sum / `num_items_in_batch`. Calling the head module means a tied head
  uses the tied embedding, and FSDP (which gathers a module's parameters in its pre-forward hook and hooks the
  backward on that module's outputs) sees an ordinary call, never a read of a still-sharded attribute. In eval
  mode, without labels, with `logits_to_keep`, `return_dict=False` or TRL's `fused_lm_head` (unless
  `trl_head=True`: `sftfuse.patch.trl`), the original forward runs unchanged, so evaluation and `generate()` are
  as before. Inside `with loss_only():` a call in eval mode with labels takes the fused loss too (logits=None): for
  callers that want only the loss (the trainer's validation and probe), which then never form the (tokens x V)
  logits and skip the rows without a label.
- lora: a PEFT LoRA `Linear` (over `nn.Linear`, bitsandbytes NF4 `Linear4bit` or sftfuse `NF4Linear`) computes
  `lora_linear(x, base, A, B, scaling, bias=, dropout=)` on the same parameters, in the base's compute dtype (PEFT
  upcasts activations to its fp32 adapters; lora_linear casts the adapters down, unless its GEMMs run in fp32
  anyway, and returns their gradients in fp32). What else PEFT does (several active adapters, DoRA and other
  variants, `lora_bias`, merged weights, `adapter_names`, disabled adapters) is left to PEFT: refused at patch time
  with a reason, or handed to the original forward when switched on after patching.
- nf4: a bitsandbytes NF4 `Linear4bit` computes `nf4_matmul` on a zero-copy `NF4Weight` view of its quant state.
- mlp: a family's gated MLP (class named in the family table) whose gate, up and down projections are all LoRA
  linears (PEFT's, passing the lora checks, or sftfuse's; no bias) runs as one `lora_mlp`, which autograd would
  otherwise keep four (tokens x intermediate) activations for. Over 4-bit bases it saves x and the three rank-r
  projections and runs gate and up again in the backward; over 16-bit bases it also keeps gate's and up's outputs
  (`patch_model(mlp="recompute" | "save")` forces either). SiLU and tanh-GELU activations.
- rms_norm: a family's RMSNorm runs as `rms_norm`, HF's numerics (Llama's or Gemma-2's rule, from the table),
  saving its 16-bit input and one fp32 scale per row instead of fp32 copies of the activations.
- attention: a family's attention module whose `config._attn_implementation` is "sdpa" runs its own forward
  with torch's `scaled_dot_product_attention` answered by `sftfuse.ops.attention.scaled_dot_product_attention`
  (fp32 on CPUs where its measured time says so: the 16-bit inputs, the fp32 output and its lse saved). The answer
  comes from a `TorchFunctionMode` entered around that module's call only, on CPU inputs: no function is
  replaced anywhere, so other modules, models and threads see torch's own. Eager and flash implementations are
  left alone (they do not call it; Gemma-2's attention softcap needs eager).
The mlp, rms_norm and attention swaps only act while autograd records; in no_grad (eval, `generate()`) the
original runs.
sftfuse's own `NF4Linear` and `LoRALinear` already run the fused ops and are listed as native.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from sftfuse.patch.families import FAMILIES, Family, family_of, loaded_classes
from sftfuse.patch.swaps import SWAPS, Swap, _is_nf4_linear

_RECORD = "_sftfuse_forward"  # instance attribute: the _Forward we installed (present while patched)
_LOSS_ONLY = contextvars.ContextVar("sftfuse_loss_only", default=False)


@contextlib.contextmanager
def loss_only() -> Iterator[None]:
    """Within it, a patched causal LM called with labels returns the fused loss in eval mode as in training
    (`logits=None`): for evaluations that need only the loss. Per thread / async context; nests."""
    token = _LOSS_ONLY.set(True)
    try:
        yield
    finally:
        _LOSS_ONLY.reset(token)


class _Forward:
    """A per-instance forward: `impl(module, original, *args, **kwargs)` while active, else `original`."""

    def __init__(self, module: nn.Module, impl: Callable, state: dict[str, Any]):
        self.had_instance_forward = "forward" in module.__dict__
        self.original = module.forward  # bound method of the class, or whatever instance forward was there
        self.module, self.impl, self.state, self.active = module, impl, state, True
        self.__signature__ = inspect.signature(self.original)
        self.__wrapped__ = self.original

    def __call__(self, *args, **kwargs):
        if self.active:
            return self.impl(self.module, self.original, self.state, *args, **kwargs)
        return self.original(*args, **kwargs)


def _install(module: nn.Module, impl: Callable, state: dict[str, Any] | None = None) -> None:
    fwd = getattr(module, _RECORD, None)
    if fwd is not None and module.__dict__.get("forward") is fwd:  # idempotent: refresh, never stack
        fwd.impl, fwd.state, fwd.active = impl, state or {}, True
        return
    fwd = _Forward(module, impl, state or {})
    module.forward = fwd
    setattr(module, _RECORD, fwd)


def _uninstall(module: nn.Module) -> bool:
    """Restore `module`'s previous forward; True when done exactly, False when someone wrapped ours since."""
    fwd = module.__dict__.get(_RECORD)
    if fwd is None:
        return True
    fwd.active = False  # a wrapper installed over ours (e.g. TRL's) keeps working and now reaches the original
    if module.__dict__.get("forward") is not fwd:
        return False
    if fwd.had_instance_forward:
        module.forward = fwd.original
    else:
        del module.forward
    del module.__dict__[_RECORD]
    return True


# =============================================================================================================
# loss swap: *ForCausalLM forward + lm_head forward
# =============================================================================================================


def _causal_lm_forward(model, original, state, *args, **kwargs):
    if kwargs.get("fused_lm_head") and state.get("trl_head") and model.training:
        from sftfuse.patch.trl import trl_head_forward

        call = dict(zip(state["arg_names"], args, strict=False))
        return trl_head_forward(model, original, state, {**call, **kwargs}, args, kwargs)
    if not (model.training or _LOSS_ONLY.get()) or kwargs.get("fused_lm_head") or kwargs.get("return_dict") is False:
        return original(*args, **kwargs)
    call = dict(zip(state["arg_names"], args, strict=False))
    call.update(kwargs)
    labels, shift = call.pop("labels", None), call.pop("shift_labels", None)
    keep = call.pop("logits_to_keep", 0)
    if labels is None or not (keep is None or (isinstance(keep, int) and keep == 0)):
        return original(*args, **kwargs)
    n_items = call.pop("num_items_in_batch", None)
    ignore_index = call.pop("ignore_index", -100)
    family: Family = state["family"]
    out = getattr(model, family.decoder)(**call)
    hidden = out.last_hidden_state  # (B, T, H)
    head = getattr(model, family.lm_head)
    # Through the head module's __call__: hooks (FSDP gather, accelerate device moves) run as for the logits.
    loss = head(hidden, _sftfuse_loss=dict(
        labels=labels if shift is None else shift, shift_labels=shift is None, ignore_index=ignore_index,
        num_items_in_batch=n_items, softcap=family.softcap(model.config), logit_scale=family.logit_scale(model.config)))
    result = dict(loss=loss, logits=None, hidden_states=getattr(out, "hidden_states", None),
                  attentions=getattr(out, "attentions", None))
    cache_field = state["cache_field"]
    if cache_field:
        result[cache_field] = getattr(out, cache_field, None)
    return state["output_cls"](**result)


def _head_forward(head, original, state, hidden, *args, _sftfuse_loss=None, **kwargs):
    if _sftfuse_loss is None:
        return original(hidden, *args, **kwargs)
    from sftfuse.ops import cross_entropy as ce_op  # looked up per call: tests may swap in a reference

    labels = _sftfuse_loss.pop("labels").to(hidden.device)
    n_items = _sftfuse_loss.pop("num_items_in_batch")
    if torch.is_tensor(n_items):
        n_items = n_items.to(hidden.device)
    return ce_op.linear_cross_entropy(hidden, head.weight, labels, bias=head.bias, num_items_in_batch=n_items,
                                       **_sftfuse_loss)


def _is_causal_lm(module: nn.Module) -> bool:
    # PEFT's PeftModelForCausalLM is named like one too, but is no PreTrainedModel: the walk reaches the inner model.
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(module, PreTrainedModel) and type(module).__name__.endswith("ForCausalLM")


def _check_loss(model, strict: bool) -> str | None:
    family = family_of(model)
    model_type = getattr(model.config, "model_type", None)
    if family is None:
        msg = f"family {model_type!r} is not supported by the loss swap (supported: {', '.join(FAMILIES)})"
        if strict:
            raise ValueError(f"model: {msg}; pass strict=False to patch only the generic parts")
        return msg
    head = getattr(model, family.lm_head, None)
    # isinstance, not type(): FSDP2 swaps the class for a subclass. bitsandbytes' 4/8-bit linears and sftfuse's
    # NF4Linear subclass nn.Linear too, with packed weights the fused loss cannot read.
    if not isinstance(head, nn.Linear) or _is_nf4_linear(head) or isinstance(
            head, loaded_classes("bitsandbytes.nn.modules", "Linear4bit", "Linear8bitLt")):
        return f"{family.lm_head} is a {type(head).__name__}, not a 16/32-bit nn.Linear"
    if not isinstance(getattr(model, family.decoder, None), nn.Module):
        return f"no decoder module at .{family.decoder}"
    return None


def _patch_loss(model, trl_head: bool = False) -> list[tuple[str, nn.Module, str]]:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    family = family_of(model)
    names = {f.name for f in fields(CausalLMOutputWithPast)}
    original = model.__dict__[_RECORD].original if _RECORD in model.__dict__ else model.forward
    params = inspect.signature(original).parameters.values()
    state = dict(family=family, output_cls=CausalLMOutputWithPast, trl_head=trl_head,
                 cache_field=next((n for n in ("cache", "past_key_values") if n in names), None),
                 arg_names=[p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
    head = getattr(model, family.lm_head)
    _install(model, _causal_lm_forward, state)
    _install(head, _head_forward)
    return [(family.lm_head, head, "linear_cross_entropy (head weight via the module call)")]


# =============================================================================================================
# the table, the walk, the report
# =============================================================================================================


_SWAPS = (Swap("cross_entropy", _is_causal_lm, _check_loss, _causal_lm_forward, "linear_cross_entropy"), *SWAPS)


def _type_name(module: nn.Module) -> str:
    prefix = {"peft": "lora.", "bitsandbytes": "bnb."}.get(type(module).__module__.split(".")[0], "")
    return prefix + type(module).__name__


@dataclass
class PatchEntry:
    """One module the walk matched: swapped (`op` set) or left alone (`reason` set)."""

    name: str
    kind: str
    module_type: str
    op: str | None = None
    reason: str | None = None


@dataclass
class PatchReport:
    """What `patch_model` did. `swapped` and `skipped` list every matched module; `str(report)` is a short table."""

    family: str | None = None
    swapped: list[PatchEntry] = field(default_factory=list)
    skipped: list[PatchEntry] = field(default_factory=list)
    cpu_plan: str | None = None  # a CPU model: the per-CPU choices the ops make (`sftfuse.kernels._cpu.cpu_plan`)
    notes: list[str] = field(default_factory=list)  # what the table cannot say (e.g. a loss that bypasses ours)

    def counts(self) -> dict[tuple[str, str, str], int]:
        """(status, module type, op or reason) -> number of modules."""
        rows: dict[tuple[str, str, str], int] = {}
        for status, entries in (("swapped", self.swapped), ("left alone", self.skipped)):
            for e in entries:
                key = (status, e.module_type, e.op or e.reason or "")
                rows[key] = rows.get(key, 0) + 1
        return rows

    def __str__(self) -> str:
        lines = [f"sftfuse patch report (family: {self.family or 'unknown'})",
                 f"{'status':<11} {'count':>5}  {'module':<24} op / reason"]
        lines += [f"{s:<11} {n:>5}  {t:<24} {what}" for (s, t, what), n in self.counts().items()]
        lines += [f"note: {n}" for n in self.notes]
        if self.cpu_plan:
            lines.append(self.cpu_plan)
        return "\n".join(lines)


def patch_model(model: nn.Module, *, cross_entropy: bool = True, lora: bool = True, nf4: bool = True,
                mlp: bool | str = True, rms_norm: bool = True, attention: bool = True,
                strict: bool = False, trl_head: bool = False) -> PatchReport:
    """Swap sftfuse's fused ops into `model` (this instance only) and report what was swapped.

    Args:
        model: a transformers `*ForCausalLM`, a PEFT `PeftModel` wrapping one, or any module holding PEFT LoRA
            linears, bitsandbytes NF4 `Linear4bit` or sftfuse `NF4Linear` / `LoRALinear` layers.
        cross_entropy: swap the causal-LM loss for `linear_cross_entropy` (training forward with labels returns
            `loss` and `logits=None`; see the module docstring for the exact rule).
        lora: swap PEFT LoRA linears for `lora_linear` on the same parameters.
        nf4: swap bitsandbytes NF4 linears for `nf4_matmul`.
        mlp: run a family's gated MLP whose gate, up and down are all LoRA linears as one `lora_mlp`. True or
            "auto": over 4-bit bases (QLoRA, where memory is the point) it saves x and the rank-r projections and
            runs gate and up again in the backward; over 16-bit bases it also saves gate's and up's outputs (half
            of the unfused block's activations, no repeated GEMM). "recompute" or "save" force either; False
            leaves the MLPs alone. Only while autograd records.
        rms_norm: run a family's RMSNorm as `rms_norm` (same numerics; saves the 16-bit input, not fp32 copies).
            Only while autograd records.
        attention: answer torch's scaled_dot_product_attention inside a family's sdpa attention modules with
            sftfuse's (fp32 on CPUs where that is faster; see the module docstring). Only while autograd records.
        strict: raise ValueError (naming the supported families) when the model's family has no table row,
            instead of patching only the generic parts.
        trl_head: answer TRL SFTTrainer's `fused_lm_head=True` calls with sftfuse's loss (`sftfuse.patch.trl`; TRL's
            entropy and token-accuracy metrics then log NaN). Off, TRL's own head computes the loss: the report
            says so when it finds TRL's head on the model. Patch after building the trainer.

    Returns:
        PatchReport. Patching twice is the same as patching once; `unpatch_model` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if mlp not in (True, False, "auto", "recompute", "save"):
        raise ValueError(f"mlp: expected True, False, 'auto', 'recompute' or 'save', got {mlp!r}")
    enabled = {"cross_entropy": cross_entropy, "lora": lora, "nf4": nf4, "mlp": bool(mlp), "rms_norm": rms_norm,
               "attention": attention}
    report = PatchReport()
    for name, module in model.named_modules():
        swap = next((s for s in _SWAPS if s.match(module)), None)
        if swap is None:
            continue
        entry = PatchEntry(name or "<root>", swap.kind, _type_name(module))
        if swap.kind == "cross_entropy":
            report.family = getattr(module.config, "model_type", None)
        entry.reason = swap.check(module, strict) if enabled[swap.kind] else f"{swap.kind}=False"
        if entry.reason is not None:
            report.skipped.append(entry)
            _unpatch_one(module)  # a flag switched off now undoes an earlier patch of that kind
            continue
        entry.op = swap.op
        report.swapped.append(entry)
        if swap.kind == "cross_entropy":
            for sub, head, op in _patch_loss(module, trl_head):
                report.swapped.append(PatchEntry(f"{name}.{sub}" if name else sub, swap.kind, type(head).__name__, op))
        elif swap.impl is not None:
            _install(module, swap.impl, swap.state(module, {"mlp": mlp}) if swap.state else None)
    _note_trl(model, report, trl_head)
    if report.swapped and any(p.device.type == "cpu" for p in model.parameters()):
        from sftfuse.kernels._cpu import cpu_plan

        report.cpu_plan = str(cpu_plan())  # measured once per process: the same choices every op makes
    return report


def _note_trl(model: nn.Module, report: PatchReport, trl_head: bool) -> None:
    from sftfuse.patch.trl import has_trl_head

    if not any(e.kind == "cross_entropy" for e in report.swapped):
        return
    if not any(has_trl_head(m) for m in model.modules()):
        return
    if trl_head:
        report.notes.append("TRL's fused LM head found: its training calls run sftfuse's linear_cross_entropy "
                            "(trl_head=True; TRL's entropy and mean_token_accuracy metrics log NaN)")
    else:
        report.notes.append("TRL's fused LM head found: TRL computes the loss with its own head and "
                            "linear_cross_entropy is bypassed; patch_model(..., trl_head=True) makes it reachable")


def _unpatch_one(module: nn.Module) -> int:
    restored = _uninstall(module) if _RECORD in module.__dict__ else 0
    if _is_causal_lm(module) and family_of(module) is not None:
        head = getattr(module, family_of(module).lm_head, None)
        if isinstance(head, nn.Module) and _RECORD in head.__dict__:
            restored += _uninstall(head)
    return restored


def unpatch_model(model: nn.Module) -> int:
    """Undo `patch_model` on every module of `model`; returns how many forwards were restored.

    A forward another library wrapped over ours after patching (e.g. TRL's fused head) cannot be unwound from the
    inside: ours is switched off instead, so that wrapper reaches the original behaviour.
    """
    return sum(_uninstall(m) for m in model.modules() if _RECORD in m.__dict__)


def is_patched(module: nn.Module) -> bool:
    """True when `module`'s forward is an active sftfuse swap."""
    fwd = module.__dict__.get(_RECORD)
    return fwd is not None and fwd.active
