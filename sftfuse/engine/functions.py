"""Autograd Functions, one per op, each dispatching to its Triton path (CUDA tensors) or PyTorch path (CPU).

`sftfuse.kernels._registry.use_triton` makes the choice; `SFTFUSE_BACKEND=torch|triton` overrides it.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from sftfuse.kernels._registry import use_triton
from sftfuse.kernels.nf4 import NF4Weight, nf4_matmul_bwd, nf4_matmul_fwd


def _without_autocast(fn):
    """Run a Function's forward or backward with autocast off: the kernels choose their own dtypes, and under
    autocast a matmul inside them would be recast (the PyTorch paths' fp32 CPU GEMMs back to bf16, say)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)

    return run


# =============================================================================================================
# linear + cross-entropy (sftfuse/kernels/cross_entropy.py)
# =============================================================================================================

_REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class _CEOptions:
    """The loss options, one named bundle (the Function takes tensors + this, never a long positional list)."""

    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: float | None
    logit_scale: float
    num_items: float | None


@dataclass(frozen=True)
class CrossEntropyStats:
    """What `linear_cross_entropy(..., return_stats=True)` reports beside the loss (detached 0-dim tensors).

    n_tokens: counted tokens (int64). accuracy: share of counted tokens whose label logit is the largest (fp32,
    0 when none counted). mean_z: mean log-sum-exp z over counted tokens (fp32, 0 when none counted).
    """

    n_tokens: torch.Tensor
    accuracy: torch.Tensor
    mean_z: torch.Tensor

    def __getitem__(self, key: str) -> torch.Tensor:
        return getattr(self, key)


class _LinearCrossEntropy(torch.autograd.Function):
    """Only counted rows reach a matmul. Torch path: gradients formed in the forward (rows gathered a chunk at a
    time, dh written into the (N, H) gradient), scaled in the backward (reduction "none": recomputed in the
    backward with per-row weights). Triton path: counted rows gathered; backward recomputes logit tiles."""

    @staticmethod
    @_without_autocast
    def forward(ctx, hidden, weight, bias, y, idx, opts: _CEOptions):
        """hidden: (N, H) all rows; idx: (n,) the counted rows (None: all); y: (n,) their labels."""
        from sftfuse.kernels import cross_entropy as ce

        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        kw = {"label_smoothing": opts.label_smoothing, "z_loss": opts.z_loss, "softcap": opts.softcap,
              "logit_scale": opts.logit_scale}
        n = y.shape[0]
        if opts.reduction == "mean":
            row_weight = torch.full((n,), 1.0 / (opts.num_items if opts.num_items is not None else max(n, 1)),
                                    dtype=torch.float32, device=y.device)
        else:
            row_weight = torch.ones(n, dtype=torch.float32, device=y.device)
        ctx.opts, ctx.kw, ctx.needs = opts, kw, (need_dh, need_dw, need_db)
        ctx.triton = use_triton(hidden, weight)
        ctx.rows, ctx.hidden_dtype = hidden.shape[0], hidden.dtype
        any_grad = need_dh or need_dw or need_db
        if ctx.triton or opts.reduction == "none" or not any_grad:
            h = hidden if idx is None else hidden.index_select(0, idx)  # counted rows only
            if ctx.triton:
                loss, lse, hit = ce.linear_cross_entropy_fwd(h, weight, bias, y, **kw)
            else:
                loss, lse, hit, *_ = ce.linear_cross_entropy_torch(h, weight, bias, y, None, **kw)
            ctx.save_for_backward(h, weight, bias, y, lse, row_weight, idx)
        else:  # PyTorch path: rows gathered a chunk at a time, dh written straight into an (N, H) gradient
            loss, lse, hit, dh, dw, db = ce.linear_cross_entropy_torch(
                hidden, weight, bias, y, row_weight, rows_idx=idx, need_dh=need_dh, need_dw=need_dw,
                need_db=need_db, **kw)
            ctx.grads = [dh, dw, db]  # fp32, owned: the backward scales them in place and hands them over
        total = loss if opts.reduction == "none" else (loss * row_weight).sum()
        stats = torch.stack([lse.sum(), hit.sum().float()]) if n else torch.zeros(2, device=y.device)
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_out, _grad_stats):
        from sftfuse.kernels import cross_entropy as ce

        need_dh, need_dw, need_db = ctx.needs
        if hasattr(ctx, "grads"):
            if ctx.grads is None:
                raise RuntimeError("linear_cross_entropy: backward ran twice; its gradients were handed over")
            grads, ctx.grads = ctx.grads, None
            if not (grad_out == 1).all():
                g = grad_out.float()
                grads = [t.mul_(g) if t is not None else None for t in grads]
        else:
            h, weight, bias, y, lse, row_weight, idx = ctx.saved_tensors
            row_weight = row_weight * grad_out.float()  # per-row upstream gradient for "none", a scalar otherwise
            if ctx.triton:
                grads = ce.linear_cross_entropy_bwd(h, weight, bias, y, lse, row_weight, need_dw=need_dw,
                                                    need_db=need_db, **ctx.kw)
            else:
                grads = ce.linear_cross_entropy_torch(h, weight, bias, y, row_weight, need_dh=need_dh,
                                                      need_dw=need_dw, need_db=need_db, **ctx.kw)[3:]
            grads = list(grads)
            if grads[0] is not None and idx is not None:  # counted rows' gradient into the (N, H) one
                grads[0] = grads[0].new_zeros(ctx.rows, grads[0].shape[1]).index_copy_(0, idx, grads[0])
        if grads[0] is not None:
            grads[0] = grads[0].to(ctx.hidden_dtype)
        return (*grads, None, None, None)


def _as_float(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None


def linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0, num_items_in_batch=None,
                         shift_labels=False, return_stats=False):
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `labels`, without ever holding the full logits.

    Rows whose label is `ignore_index` (after the optional shift) are dropped before the matmul. Logits are
    `logit_scale * (hidden @ weight.T + bias)`, then `softcap * tanh(logits / softcap)` when softcap is set.
    Accumulation (log-sum-exp, loss, weight gradient) is fp32 whatever the input dtype; matmuls run in the
    weight's dtype (hidden is cast to it). The loss is returned in fp32.

    Args:
        hidden: (..., H) float. weight: (V, H), same device. labels: (...) integer, hidden's leading shape.
        bias: (V,) or None.
        ignore_index: label value that is not counted (default -100).
        reduction: "mean" (default; over counted tokens), "sum", or "none" (per token, 0 where not counted).
        label_smoothing: eps in [0, 1], as F.cross_entropy's (default 0).
        z_loss: weight of lse^2 per counted token (default 0).
        softcap: cap > 0 for cap * tanh(logits / cap), applied after logit_scale (default None: off).
        logit_scale: multiplies the logits first (default 1).
        num_items_in_batch: with reduction="mean", the denominator instead of this call's counted tokens, so
            that summing losses over gradient-accumulation micro-batches is exact (default None).
        shift_labels: predict labels[..., t + 1] from hidden[..., t] (causal shift done here; default False).
        return_stats: also return a `CrossEntropyStats` (n_tokens, accuracy, mean_z).
    Returns:
        loss: 0-dim fp32, or (...) fp32 with reduction="none"; and stats when return_stats=True.
        With no counted token the loss is 0 and every gradient is zero.
    """
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, {hidden.shape[-1]}), got {getattr(weight, 'shape', weight)}")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must be an integer tensor of shape {tuple(hidden.shape[:-1])}, got "
                         f"{getattr(labels, 'dtype', type(labels))} {tuple(getattr(labels, 'shape', ()))}")
    V = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias must be ({V},), got {tuple(bias.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    label_smoothing, z_loss = _as_float(label_smoothing, "label_smoothing"), _as_float(z_loss, "z_loss")
    logit_scale = _as_float(logit_scale, "logit_scale")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None:
        softcap = _as_float(softcap, "softcap")
        if not softcap > 0:
            raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    num_items = None
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError(f"num_items_in_batch replaces the mean's denominator; reduction is {reduction!r}")
        num_items = _as_float(num_items_in_batch, "num_items_in_batch")
    labels = labels.long()
    if shift_labels:
        labels = torch.cat([labels[..., 1:], labels.new_full((*labels.shape[:-1], 1), ignore_index)], dim=-1)
    flat_y = labels.reshape(-1)
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    idx = (flat_y != ignore_index).nonzero().squeeze(1)  # (n,) counted rows: the only ones that reach a matmul
    n = idx.numel()
    if n == hidden2.shape[0]:
        idx, y = None, flat_y
    else:
        y = flat_y.index_select(0, idx)
    if n and (int(y.min()) < 0 or int(y.max()) >= V):
        lo, hi = int(y.min()), int(y.max())
        raise ValueError(f"labels must be in [0, {V}) or {ignore_index}, got values in [{lo}, {hi}]")
    if num_items is not None and n and not num_items > 0:
        raise ValueError(f"num_items_in_batch must be > 0 when tokens are counted, got {num_items}")
    opts = _CEOptions(reduction, label_smoothing, z_loss, softcap, logit_scale, num_items)
    loss, sums = _LinearCrossEntropy.apply(hidden2.to(weight.dtype).contiguous(), weight.contiguous(),
                                           None if bias is None else bias.contiguous(), y, idx, opts)
    if reduction == "none":
        loss = loss if idx is None else loss.new_zeros(flat_y.shape).index_put((idx,), loss)
        loss = loss.reshape(labels.shape)
    if not return_stats:
        return loss
    count = torch.tensor(n, device=hidden.device)
    stats = CrossEntropyStats(count, sums[1] / max(n, 1), sums[0] / max(n, 1))
    return loss, stats



# =============================================================================================================
# NF4 matmul (sftfuse/kernels/nf4.py)
# =============================================================================================================


class _NF4Matmul(torch.autograd.Function):
    """y = x @ dequant(q)^T + b; dx = dy @ dequant(q). The 4-bit weight is frozen: no weight gradient."""

    @staticmethod
    @_without_autocast
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, q: NF4Weight) -> torch.Tensor:
        ctx.q = q  # the packed weight itself: nothing dequantized is kept for the backward
        ctx.has_bias = bias is not None
        return nf4_matmul_fwd(x, q, bias)

    @staticmethod
    @_without_autocast
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



# =============================================================================================================
# LoRA linear (sftfuse/kernels/lora.py)
# =============================================================================================================


def _adapter_dtype(x: torch.Tensor, base) -> torch.dtype:
    """The dtype LoRA adapters compute in: x's, or on the PyTorch path the GEMM dtype it picks for a dense base
    (fp32 on CPUs where fp32 GEMMs are faster), so fp32 adapters are neither rounded to x's dtype nor copied."""
    if use_triton(x):
        return x.dtype
    from sftfuse.kernels.lora import _gemm_dtype

    return _gemm_dtype(x, base)


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + s * (dropout(x) A^T) B^T; saves x, t = dropout(x) A^T and the dropout seed only."""

    @staticmethod
    @_without_autocast
    def forward(ctx, x, base, lora_A, lora_B, bias, scaling, p, seed):
        from sftfuse.kernels.lora import lora_linear_fwd

        x2 = x.reshape(-1, x.shape[-1])  # a view when x is contiguous: shares storage with the caller's x
        cd = _adapter_dtype(x, base)
        A, B = lora_A.to(cd), lora_B.to(cd)  # adapters kept in another dtype compute in x's (or the GEMM's)
        b = bias.to(x.dtype) if bias is not None else None
        y, t = lora_linear_fwd(x2, base, A, B, scaling, bias=b, seed=seed, p=p)
        dense = isinstance(base, torch.Tensor)
        ctx.save_for_backward(x2, t, lora_A, lora_B, base if dense else None)  # the adapters, not their casts
        ctx.cd = cd
        ctx.nf4 = None if dense else base
        ctx.scaling, ctx.p, ctx.seed, ctx.x_shape = scaling, p, seed, x.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @_without_autocast
    def backward(ctx, dy):
        from sftfuse.kernels.lora import lora_linear_bwd

        x2, t, lora_A, lora_B, W = ctx.saved_tensors
        A, B = lora_A.to(ctx.cd), lora_B.to(ctx.cd)
        base = W if W is not None else ctx.nf4
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
        dx, dA, dB = lora_linear_bwd(dy2, x2, t, base, A, B, ctx.scaling, seed=ctx.seed, p=ctx.p,
                                     need_dx=ctx.needs_input_grad[0])
        db = dy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if ctx.needs_input_grad[4] else None
        dx = dx.reshape(ctx.x_shape) if dx is not None else None
        return dx, None, dA.to(lora_A.dtype), dB.to(lora_B.dtype), db, None, None, None


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
    from sftfuse.kernels.lora import new_seed

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
    return LoRALinearFunction.apply(x, base, lora_A, lora_B, bias, float(scaling), p, seed)
