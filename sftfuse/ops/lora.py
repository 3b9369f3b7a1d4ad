"""LoRA linear: the autograd Function and `lora_linear` (kernels: sftfuse/kernels/lora.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from sftfuse.kernels.lora import adapter_dtype, lora_linear_bwd, lora_linear_fwd, new_seed
from sftfuse.ops._common import without_autocast


@dataclass(frozen=True)
class LoRAOptions:
    """A LoRA projection's non-tensor arguments: scaling s, dropout probability p and the seed of its mask."""

    scaling: float
    p: float
    seed: int


class _LoRASaved(NamedTuple):
    """What LoRALinearFunction keeps for the backward (through save_for_backward): no dropped-out copy of x."""

    x2: torch.Tensor  # (M, K) a view of the caller's x
    t: torch.Tensor  # (M, r) dropout(x) A^T
    lora_A: torch.Tensor  # (r, K) the adapter itself, not its cast
    lora_B: torch.Tensor  # (N, r)
    weight: torch.Tensor | None  # (N, K) a dense base; None for an NF4 base (kept on ctx)


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + s * (dropout(x) A^T) B^T; saves x, t = dropout(x) A^T and the dropout seed (from which
    either path draws the same mask again in the backward)."""

    @staticmethod
    @without_autocast
    def forward(ctx, x, base, lora_A, lora_B, bias, opts: LoRAOptions):
        x2 = x.reshape(-1, x.shape[-1])  # a view when x is contiguous: shares storage with the caller's x
        cd = adapter_dtype(x, base)
        A, B = lora_A.to(cd), lora_B.to(cd)  # adapters kept in another dtype compute in x's (or the GEMM's)
        b = bias.to(x.dtype) if bias is not None else None
        y, t = lora_linear_fwd(x2, base, A, B, opts.scaling, bias=b, seed=opts.seed, p=opts.p)
        dense = isinstance(base, torch.Tensor)
        ctx.save_for_backward(*_LoRASaved(x2, t, lora_A, lora_B, base if dense else None))
        ctx.opts, ctx.cd, ctx.nf4, ctx.x_shape = opts, cd, None if dense else base, x.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @without_autocast
    def backward(ctx, dy):
        saved, opts = _LoRASaved(*ctx.saved_tensors), ctx.opts
        A, B = saved.lora_A.to(ctx.cd), saved.lora_B.to(ctx.cd)
        base = saved.weight if saved.weight is not None else ctx.nf4
        dy2 = dy.reshape(-1, dy.shape[-1]).to(saved.x2.dtype)
        dx, dA, dB = lora_linear_bwd(dy2, saved.x2, saved.t, base, A, B, opts.scaling, seed=opts.seed, p=opts.p,
                                     need_dx=ctx.needs_input_grad[0])
        db = dy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if ctx.needs_input_grad[4] else None
        dx = dx.reshape(ctx.x_shape) if dx is not None else None
        return dx, None, dA.to(saved.lora_A.dtype), dB.to(saved.lora_B.dtype), db, None


def lora_linear(x, base, lora_A, lora_B, scaling, *, bias=None, dropout=0.0, training=True):
    """LoRA over a frozen base: y = x W^T + b + scaling * (dropout(x) A^T) B^T, with a memory-lean backward.

    Args:
        x: (..., in). base: (out, in) tensor, or an `NF4Weight` of shape (out, in). x is cast to a dense base's
            dtype when they differ (fp32 activations under autocast over a bf16 base), as autocast casts for F.linear;
            its gradient comes back in x's own dtype.
        lora_A: (r, in). lora_B: (out, r). Any float dtype; they compute in x's dtype (as they are where the
            PyTorch path runs a dense base's GEMMs in fp32), grads come back in theirs.
        scaling: alpha / r (or alpha / sqrt(r), rsLoRA).
        bias: (out,) or None (frozen unless it requires grad). dropout: probability on the adapter's input.
        training: dropout applies only when True.
    Returns:
        (..., out) in x's dtype. Gradients flow to x, lora_A, lora_B (and bias if it requires grad), never to base.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {type(x).__name__}")
    out_f, in_f = tuple(base.shape)
    if isinstance(base, torch.Tensor):
        if base.dim() != 2:
            raise ValueError(f"base: expected (out, in), got shape {tuple(base.shape)}")
        if not base.is_floating_point():
            raise TypeError(f"base: expected a floating-point weight, got {base.dtype}")
        if base.dtype != x.dtype:  # e.g. fp32 activations under autocast over a bf16 base: compute in the base's
            x = x.to(base.dtype)
    if x.shape[-1] != in_f:
        raise ValueError(f"x: last dim {x.shape[-1]} != base in_features {in_f}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A: expected (r, {in_f}), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"lora_B: expected ({out_f}, {r}), got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias: expected ({out_f},), got {tuple(bias.shape)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected 0 <= p < 1, got {dropout}")
    p = float(dropout) if training else 0.0
    seed = new_seed() if p > 0 else 0
    return LoRALinearFunction.apply(x, base, lora_A, lora_B, bias, LoRAOptions(float(scaling), p, seed))
