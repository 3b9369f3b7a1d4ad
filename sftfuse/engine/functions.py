"""Autograd Functions, one per op, each dispatching to its Triton path (CUDA tensors) or PyTorch path (CPU).

`sftfuse.kernels._registry.use_triton` makes the choice; `SFTFUSE_BACKEND=torch|triton` overrides it.
"""

from __future__ import annotations

import torch

# =============================================================================================================
# linear + cross-entropy (sftfuse/kernels/cross_entropy.py)
# =============================================================================================================


# =============================================================================================================
# NF4 matmul (sftfuse/kernels/nf4.py)
# =============================================================================================================


# =============================================================================================================
# LoRA linear (sftfuse/kernels/lora.py)
# =============================================================================================================


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + s * (dropout(x) A^T) B^T; saves x, t = dropout(x) A^T and the dropout seed only."""

    @staticmethod
    def forward(ctx, x, base, lora_A, lora_B, bias, scaling, p, seed):
        from sftfuse.kernels.lora import lora_linear_fwd

        x2 = x.reshape(-1, x.shape[-1])  # a view when x is contiguous: shares storage with the caller's x
        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)  # adapters kept in another dtype compute in x's
        b = bias.to(x.dtype) if bias is not None else None
        y, t = lora_linear_fwd(x2, base, A, B, scaling, bias=b, seed=seed, p=p)
        dense = isinstance(base, torch.Tensor)
        ctx.save_for_backward(x2, t, A, B, base if dense else None)
        ctx.nf4 = None if dense else base
        ctx.scaling, ctx.p, ctx.seed, ctx.x_shape = scaling, p, seed, x.shape
        ctx.dtypes = (lora_A.dtype, lora_B.dtype, bias.dtype if bias is not None else None)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        from sftfuse.kernels.lora import lora_linear_bwd

        x2, t, A, B, W = ctx.saved_tensors
        base = W if W is not None else ctx.nf4
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
        dx, dA, dB = lora_linear_bwd(dy2, x2, t, base, A, B, ctx.scaling, seed=ctx.seed, p=ctx.p,
                                     need_dx=ctx.needs_input_grad[0])
        a_dtype, b_dtype, bias_dtype = ctx.dtypes
        db = dy2.sum(0, dtype=torch.float32).to(bias_dtype) if ctx.needs_input_grad[4] else None
        dx = dx.reshape(ctx.x_shape) if dx is not None else None
        return dx, None, dA.to(a_dtype), dB.to(b_dtype), db, None, None, None


def lora_linear(x, base, lora_A, lora_B, scaling, *, bias=None, dropout=0.0, training=True):
    """LoRA over a frozen base: y = x W^T + b + scaling * (dropout(x) A^T) B^T, with a memory-lean backward.

    Args:
        x: (..., in). base: (out, in) tensor in x's dtype, or an `NF4Weight` of shape (out, in).
        lora_A: (r, in). lora_B: (out, r). Any float dtype; they compute in x's dtype, grads come back in theirs.
        scaling: alpha / r (or alpha / sqrt(r), rsLoRA).
        bias: (out,) or None (frozen unless it requires grad). dropout: probability on the adapter's input.
        training: dropout applies only when True.
    Returns:
        (..., out) in x's dtype. Gradients flow to x, lora_A, lora_B (and bias if it requires grad), never to base.
    """
    from sftfuse.kernels.lora import new_seed

    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {type(x).__name__}")
    out_f, in_f = tuple(base.shape)
    if isinstance(base, torch.Tensor):
        if base.dim() != 2:
            raise ValueError(f"base: expected (out, in), got shape {tuple(base.shape)}")
        if base.dtype != x.dtype:
            raise TypeError(f"base: dtype {base.dtype} differs from x's {x.dtype}")
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
    return LoRALinearFunction.apply(x, base, lora_A, lora_B, bias, float(scaling), p, seed)
