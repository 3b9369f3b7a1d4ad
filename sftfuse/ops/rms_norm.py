"""RMSNorm: the autograd Function and `rms_norm` (kernels: sftfuse/kernels/rms_norm.py)."""

from __future__ import annotations

import torch

from sftfuse.ops._common import without_autocast


class _RMSNormFunction(torch.autograd.Function):
    """HF's RMSNorm (rule "weight" or "one_plus"); saves x and one fp32 scale per row."""

    @staticmethod
    @without_autocast
    def forward(ctx, x, weight, eps, rule):
        from sftfuse.kernels.rms_norm import rms_norm_fwd

        y, r = rms_norm_fwd(x, weight, eps, rule)
        ctx.save_for_backward(x, r, weight)
        ctx.rule = rule
        return y

    @staticmethod
    @without_autocast
    def backward(ctx, dy):
        from sftfuse.kernels.rms_norm import rms_norm_bwd

        x, r, weight = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy, x, r, weight, ctx.rule, ctx.needs_input_grad[1])
        return dx, dw, None, None


def rms_norm(x, weight, eps, rule="weight"):
    """RMSNorm over the last dim, Hugging Face's numerics: rule "weight" is Llama's w * dtype(x_hat), "one_plus"
    Gemma-2's dtype(x_hat * (1 + w)). Saves only x and one fp32 scale per row for the backward."""
    from sftfuse.kernels.rms_norm import RULES

    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight: expected shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    return _RMSNormFunction.apply(x, weight, float(eps), rule)
