"""TRL's fused LM head, answered by sftfuse's `linear_cross_entropy` (`patch_model(..., trl_head=True)`).

TRL 1.16's SFTTrainer (and its DPO, KTO, GRPO, RLOO trainers) installs its own LM head on the model
(`trl.trainer.utils.add_fused_lm_head`) and calls `model(..., labels=, fused_lm_head=True)`: the per-token
log-probabilities come from TRL's chunked head, and the trainer reduces them to the loss itself. So under TRL the
loss swap of `patch_model` is bypassed: by default the patched forward hands such a call to the forward it replaced
(TRL's), and only the swaps below the head (LoRA, MLP, RMSNorm, attention) run. On CPU TRL's head scores every
position, prompt tokens included, and computes the entropy and the top-1 flag of every row as well.

With `trl_head=True` the patched forward answers such a training call itself: the family's decoder, then
`linear_cross_entropy(reduction="none")` through the lm_head module on the shifted labels, which never projects a
row whose label is -100; it returns TRL's `FusedCausalLMOutput` with `log_probs` (minus the per-token loss, with
gradient), `label_mask` and `loss` (summed log-probs over `num_items_in_batch`, or over the counted tokens, as
TRL's head). TRL's `entropy` and `is_top1` are not computed: they are NaN, so TRL's "entropy" and
"mean_token_accuracy" metrics log NaN. Calls without labels or asking for MoE router logits, and eval-mode
calls, go to TRL's head unchanged. For SFTTrainer only: its head runs at temperature 1, as this one; the DPO,
GRPO and RLOO trainers may divide the logits by a temperature, which this head does not know (leave it off there).
Patch after building the trainer (`patch_model(trainer.model, trl_head=True)`): built after patching, TRL wraps
the patched forward and calls its own head directly.
"""

from __future__ import annotations

import torch


def has_trl_head(model) -> bool:
    """True when `model`'s forward is TRL's fused-head forward (`add_fused_lm_head`), installed on the instance."""
    fwd = model.__dict__.get("forward")
    fwd = getattr(fwd, "original", fwd)  # through our own _Forward, if one is installed over it
    code = getattr(getattr(fwd, "__func__", fwd), "__code__", None)  # functools.wraps renamed the function, not this
    return code is not None and code.co_name == "_fused_forward" and "trl" in code.co_filename


def trl_head_forward(model, original, state, call: dict, args, kwargs):
    """TRL's `fused_lm_head=True` training call answered with sftfuse's loss (see the module docstring)."""
    labels, shift = call.pop("labels", None), call.pop("shift_labels", None)
    if (labels is None and shift is None) or call.get("output_router_logits"):
        return original(*args, **kwargs)
    n_items = call.pop("num_items_in_batch", None)
    call.pop("fused_lm_head", None)
    call.pop("logits_to_keep", None)
    call["use_cache"] = False
    family = state["family"]
    out = getattr(model, family.decoder)(**call)
    hidden = out.last_hidden_state  # (B, T, H)
    if shift is None:  # predict token t + 1 from position t, as TRL's head
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift
    labels = labels.to(hidden.device)
    head = getattr(model, family.lm_head)
    per_token = head(hidden, _sftfuse_loss=dict(
        labels=labels, shift_labels=False, ignore_index=-100, num_items_in_batch=None, reduction="none",
        softcap=family.softcap(model.config), logit_scale=family.logit_scale(model.config)))  # (B, T - 1) fp32
    mask = labels != -100
    denom = mask.sum().clamp(min=1) if n_items is None else n_items
    loss = per_token.sum() / (denom.to(per_token.device) if torch.is_tensor(denom) else denom)
    from trl.trainer.utils import FusedCausalLMOutput

    nan = torch.full_like(per_token, float("nan"))  # not computed: TRL's entropy / accuracy metrics log NaN
    return FusedCausalLMOutput(loss=loss, log_probs=-per_token, entropy=nan, is_top1=nan, label_mask=mask)
