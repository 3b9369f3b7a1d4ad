"""NF4 matmul: the autograd Function and `nf4_matmul` (kernels: sftfuse/kernels/nf4.py)."""

from __future__ import annotations

import torch

from sftfuse.kernels.nf4 import NF4Weight, nf4_matmul_bwd, nf4_matmul_fwd
from sftfuse.ops._common import without_autocast


class _NF4Matmul(torch.autograd.Function):
    """y = x @ dequant(q)^T + b; dx = dy @ dequant(q). The 4-bit weight is frozen: no weight gradient."""

    @staticmethod
    @without_autocast
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, q: NF4Weight) -> torch.Tensor:
        ctx.q = q  # the packed weight itself: nothing dequantized is kept for the backward
        ctx.has_bias = bias is not None
        return nf4_matmul_fwd(x, q, bias)

    @staticmethod
    @without_autocast
    def backward(ctx, dy: torch.Tensor):
        dy = dy.contiguous()
        dx = nf4_matmul_bwd(dy, ctx.q) if ctx.needs_input_grad[0] else None
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return dx, db, None


def nf4_matmul(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequant(q)^T + bias with autograd to x and bias. x: (..., in) -> (..., out), in x's dtype.

    The weight is decoded tile by tile (PyTorch path) or in registers (Triton path), never stored whole.
    """
    if not isinstance(q, NF4Weight):
        raise TypeError(f"q: expected an NF4Weight, got {type(q).__name__}")
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"x: last dimension {x.shape[-1]} != in_features {q.shape[1]}")
    lead = x.shape[:-1]
    b = None if bias is None else bias.to(x.dtype)
    y = _NF4Matmul.apply(x.reshape(-1, q.shape[1]).contiguous(), b, q)
    return y.view(*lead, q.shape[0])
