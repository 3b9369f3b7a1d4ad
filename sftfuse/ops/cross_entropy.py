"""linear + cross-entropy: the autograd Function and `linear_cross_entropy` (kernels: kernels/cross_entropy*.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sftfuse.kernels import cross_entropy_launch as lce
from sftfuse.kernels._registry import use_triton
from sftfuse.kernels.cross_entropy_launch import LossOptions
from sftfuse.ops._common import without_autocast

_REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class _CEOptions:
    """The Function's non-tensor arguments, one named bundle: the reduction, its denominator override (a number, or
    a 0-dim tensor left on its device: no host sync) and the loss options the kernels take."""

    reduction: str
    loss: LossOptions
    num_items: float | torch.Tensor | None
    # grad mode at the call: under no_grad no gradient is formed (an evaluation of a trained head, full fine-tuning,
    # would otherwise form dW and dh in the forward for nothing)
    grad: bool = True


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
    """Only counted rows reach a matmul. The launcher (`sftfuse.kernels.cross_entropy_launch`) picks the path in the
    forward and returns what the backward replays: the saved tensors (an `LCESaved`, kept with save_for_backward)
    or gradients formed in the forward (PyTorch path), and an `LCEState`."""

    @staticmethod
    @without_autocast
    def forward(ctx, hidden, weight, bias, y, idx, opts: _CEOptions):
        """hidden: (N, H) all rows; idx: (n,) the counted rows (None: all); y: (n,) their labels."""
        n = y.shape[0]
        if opts.reduction == "mean" and isinstance(opts.num_items, torch.Tensor):  # 1 / count on the device
            row_weight = opts.num_items.to(y.device, torch.float64).reciprocal().float().expand(n).contiguous()
        elif opts.reduction == "mean":
            row_weight = torch.full((n,), 1.0 / (opts.num_items if opts.num_items is not None else max(n, 1)),
                                    dtype=torch.float32, device=y.device)
        else:
            row_weight = torch.ones(n, dtype=torch.float32, device=y.device)
        loss, lse, hit, saved, ctx.state = lce.linear_cross_entropy_forward(
            hidden, weight, bias, y, idx, row_weight, options=opts.loss, reduction=opts.reduction,
            needs=tuple(n and opts.grad for n in ctx.needs_input_grad[:3]))  # under no_grad: no gradient formed
        if saved is not None:
            ctx.save_for_backward(*saved)
        total = loss if opts.reduction == "none" else (loss * row_weight).sum()
        stats = torch.stack([lse.sum(), hit.sum().float()]) if n else torch.zeros(2, device=y.device)
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out, _grad_stats):
        saved = None if ctx.state.formed else lce.LCESaved(*ctx.saved_tensors)
        return (*lce.linear_cross_entropy_backward(ctx.state, saved, grad_out), None, None, None)


def _as_float(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None


def _num_items(num_items_in_batch, reduction: str, triton: bool):
    """The mean's denominator override: None, a float, or (Triton path) a 0-dim tensor left on its device."""
    if num_items_in_batch is None:
        return None
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch replaces the mean's denominator; reduction is {reduction!r}")
    if triton and isinstance(num_items_in_batch, torch.Tensor):  # kept on the device: no host sync
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar, got shape {tuple(num_items_in_batch.shape)}")
        return num_items_in_batch.reshape(())
    return _as_float(num_items_in_batch, "num_items_in_batch")


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
            that summing losses over gradient-accumulation micro-batches is exact (default None). A number or a
            one-element tensor; on the Triton path a tensor stays on its device (no host sync).
        shift_labels: predict labels[..., t + 1] from hidden[..., t] (causal shift done here; default False).
        return_stats: also return a `CrossEntropyStats` (n_tokens, accuracy, mean_z).
    Returns:
        loss: 0-dim fp32, or (...) fp32 with reduction="none"; and stats when return_stats=True.
        With no counted token the loss is 0 and every gradient is zero. Labels outside [0, V) raise ValueError
        on the PyTorch path; on the Triton path (unchecked: no host sync) they give those tokens a NaN loss.
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
    softcap = _as_float(softcap, "softcap") if softcap is not None else None
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    triton = use_triton(hidden, weight)
    num_items = _num_items(num_items_in_batch, reduction, triton)
    labels = labels.long()
    if shift_labels:
        labels = torch.cat([labels[..., 1:], labels.new_full((*labels.shape[:-1], 1), ignore_index)], dim=-1)
    flat_y = labels.reshape(-1)
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    idx = (flat_y != ignore_index).nonzero().squeeze(1)  # (n,) counted rows: the call's one host sync (its size)
    n = idx.numel()
    if n == hidden2.shape[0]:
        idx, y = None, flat_y
    else:
        y = flat_y.index_select(0, idx)
    # The label range is checked here on the PyTorch path only: on the Triton path a check would be two more host
    # syncs per call, and there a label outside [0, V) gives that token a NaN loss instead.
    if n and not triton and (int(y.min()) < 0 or int(y.max()) >= V):
        lo, hi = int(y.min()), int(y.max())
        raise ValueError(f"labels must be in [0, {V}) or {ignore_index}, got values in [{lo}, {hi}]")
    if isinstance(num_items, float) and n and not num_items > 0:
        raise ValueError(f"num_items_in_batch must be > 0 when tokens are counted, got {num_items}")
    opts = _CEOptions(reduction, LossOptions(label_smoothing, z_loss, softcap, logit_scale), num_items,
                      torch.is_grad_enabled())  # read before apply: needs_input_grad says True under no_grad too
    loss, sums = _LinearCrossEntropy.apply(hidden2.to(weight.dtype).contiguous(), weight.contiguous(),
                                           None if bias is None else bias.contiguous(), y, idx, opts)
    if reduction == "none":
        loss = loss if idx is None else loss.new_zeros(flat_y.shape).index_put((idx,), loss)
        loss = loss.reshape(labels.shape)
    if not return_stats:
        return loss
    count = torch.full((), n, dtype=torch.int64, device=hidden.device)  # a fill, not a host-to-device copy
    stats = CrossEntropyStats(count, sums[1] / max(n, 1), sums[0] / max(n, 1))
    return loss, stats
