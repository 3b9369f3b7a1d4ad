"""Attention: torch's scaled_dot_product_attention, 16-bit CPU inputs computed the way that is fastest here: torch's
flash kernel in their dtype or in fp32, or materialised scores and batched GEMMs (`sftfuse.kernels.attention`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from sftfuse.ops._common import without_autocast


@dataclass(frozen=True)
class _AttnOptions:
    """The Function's non-tensor arguments, as torch's function takes them."""

    is_causal: bool
    scale: float | None


class _AttnSaved(NamedTuple):
    """Kept for the backward (through save_for_backward): the 16-bit inputs, the fp32 output and its lse."""

    query: torch.Tensor  # (B, Hq, T, D) 16-bit
    key: torch.Tensor  # (B, Hkv, S, D)
    value: torch.Tensor  # (B, Hkv, S, D)
    attn_mask: torch.Tensor | None  # additive fp32 bias, broadcastable to (B, Hq, T, S)
    out: torch.Tensor  # (B, Hq, T, D) fp32
    lse: torch.Tensor  # (B, Hq, T) fp32


class _WideAttentionFunction(torch.autograd.Function):
    """sdpa on fp32 copies of 16-bit q, k, v through torch's CPU flash-attention kernel; saves the 16-bit inputs,
    the fp32 output and the log-sum-exp, and runs that kernel's backward on fp32 copies made again."""

    @staticmethod
    @without_autocast
    def forward(ctx, query, key, value, attn_mask, opts: _AttnOptions):
        wide = [t.float() for t in (query, key, value)]  # transient: recast in the backward
        out, lse = _flash_fwd(*wide, attn_mask=attn_mask, is_causal=opts.is_causal, scale=opts.scale)
        ctx.save_for_backward(*_AttnSaved(query, key, value, attn_mask, out, lse))
        ctx.opts = opts
        return out.to(query.dtype)

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out):
        s = _AttnSaved(*ctx.saved_tensors)
        inputs = (s.query, s.key, s.value)
        grads = _flash_bwd(grad_out.float(), *(t.float() for t in inputs), s.out, s.lse, 0.0, ctx.opts.is_causal,
                           attn_mask=s.attn_mask, scale=ctx.opts.scale)
        dq, dk, dv = (g.to(t.dtype) if need else None
                      for g, t, need in zip(grads, inputs, ctx.needs_input_grad[:3], strict=True))
        return dq, dk, dv, None, None


class _ScoresSaved(NamedTuple):
    """Kept for the backward of the scores path: the 16-bit inputs and the probabilities."""

    query: torch.Tensor  # (B, Hq, T, D)
    key: torch.Tensor  # (B, Hkv, S, D)
    value: torch.Tensor  # (B, Hkv, S, D)
    probs: torch.Tensor  # (B Hkv, G T, S), G = Hq / Hkv: softmax of the scores, 16-bit


class _ScoresAttentionFunction(torch.autograd.Function):
    """sdpa with the scores materialised (fp32) and batched GEMMs (`sftfuse.kernels.attention`); saves q, k, v and P."""

    @staticmethod
    @without_autocast
    def forward(ctx, query, key, value, attn_mask, opts: _AttnOptions):
        from sftfuse.kernels.attention import scores_attention_fwd

        out, probs = scores_attention_fwd(query, key, value, attn_mask=attn_mask, is_causal=opts.is_causal,
                                          scale=opts.scale)
        ctx.save_for_backward(*_ScoresSaved(query, key, value, probs))
        ctx.opts = opts
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out):
        from sftfuse.kernels.attention import scores_attention_bwd

        s = _ScoresSaved(*ctx.saved_tensors)
        grads = scores_attention_bwd(grad_out.to(s.query.dtype), s.query, s.key, s.value, s.probs,
                                     scale=ctx.opts.scale, need=ctx.needs_input_grad[:3])
        return *grads, None, None


# torch's CPU flash-attention kernel and its backward (private aten ops, in torch since 2.2; torch's own function
# is used where a build lacks them)
_HAS_FLASH_CPU = all(hasattr(torch.ops.aten, op) for op in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"))


def _flash_fwd(query, key, value, *, attn_mask, is_causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal,
                                                                      attn_mask=attn_mask, scale=scale)


def _flash_bwd(*args, **kwargs):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(*args, **kwargs)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """`torch.nn.functional.scaled_dot_product_attention`, same arguments and result, for 16-bit CPU inputs run the
    way this CPU runs fastest (`sftfuse.kernels._cpu.attention_mode`, measured once per process): torch's function
    ("native"), torch's flash kernel on fp32 copies ("fp32"), or the materialised scores of
    `sftfuse.kernels.attention` through three batched GEMMs each way ("scores", where the scores fit its budget).

    fp32: on a CPU without fast bf16 GEMMs torch's flash attention in bf16 runs its matmuls at bf16's rate:
    measured on this project's 2-core Xeon (B=4, 9 heads, 256 tokens, head_dim 64, causal), forward + backward
    took 23 ms in bf16 and 10-12 ms this way. The fp32 copies of q, k and v are transient: the backward keeps the
    16-bit inputs, the fp32 output and the log-sum-exp (torch's bf16 kernel keeps a bf16 output instead) and hands
    fresh fp32 copies to the same kernel's backward. Running the forward again instead, to keep the output out of
    memory (2.4 MB a layer at that shape), cost 13-15 ms. The output is the fp32 result rounded once to q's dtype;
    a bool mask becomes the additive fp32 bias torch's function makes of it.
    scores: on an AMX host, where flash runs at about the fp32 rate in either dtype, 9.5 ms a layer at that shape
    (the scores in fp32) against flash's 13-15; keeps q, k, v and the 16-bit probabilities (4.7 MB a layer there).
    Anything else (CUDA, fp32 inputs, dropout, a mask that needs a gradient, mixed dtypes or head sizes, key/value
    heads that differ from the query's without enable_gqa) runs torch's function unchanged.
    """
    from sftfuse.kernels._cpu import attention_mode

    opts = dict(dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    dtype = query.dtype
    mask_ok = attn_mask is None or (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()) and not (
        attn_mask.requires_grad and torch.is_grad_enabled())
    shapes_ok = query.dim() == 4 and key.shape == value.shape and query.shape[-1] == key.shape[-1] and (
        enable_gqa and query.shape[1] % key.shape[1] == 0 or query.shape[1] == key.shape[1]) and _HAS_FLASH_CPU
    if dropout_p > 0 or not mask_ok or not shapes_ok or key.dtype != dtype or value.dtype != dtype:
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, **opts)
    mode = attention_mode(dtype, query.device, scores_ok=_scores_ok(query, key, attn_mask, is_causal))
    if mode == "native":
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, **opts)
    if mode == "scores":  # the mask as given: the kernel folds it once for every layer
        return _ScoresAttentionFunction.apply(query, key, value, attn_mask, _AttnOptions(is_causal, scale))
    if attn_mask is not None:  # an additive fp32 bias, as torch's function hands a bool mask to this kernel
        from sftfuse.kernels.attention import additive_mask

        attn_mask = additive_mask(attn_mask)
    return _WideAttentionFunction.apply(query, key, value, attn_mask, _AttnOptions(is_causal, scale))


def _scores_ok(query, key, attn_mask, is_causal) -> bool:
    """Whether the scores path takes this call: one batch size (torch raises on the others), a
    mask of (T, S) rows with whole or broadcast leading dims (not with is_causal: torch raises), scores that fit."""
    from sftfuse.kernels.attention import scores_fit

    b, hq, t, _ = query.shape
    if key.shape[0] != b or not scores_fit(query, key):
        return False
    if attn_mask is None:
        return True
    lead = attn_mask.shape[:-2]
    return (not is_causal and attn_mask.dim() <= 4 and tuple(attn_mask.shape[-2:]) == (t, key.shape[2])
            and all(n in (1, full) for n, full in zip(reversed(lead), (hq, b), strict=False)))
