"""Launchers of linear + cross-entropy and the op's one Triton-or-PyTorch decision (the math, the reference and the
PyTorch path: `cross_entropy.py`; the Triton kernels: `cross_entropy_triton.py`).

`linear_cross_entropy_forward` decides once per call; `linear_cross_entropy_backward` replays that decision from the
`LCEState` it returned:
- Triton (CUDA tensors, or SFTFUSE_BACKEND=triton): the counted rows are gathered and the forward kernel launched;
  the backward kernel recomputes the logit tiles from the saved rows and log-sum-exp.
- PyTorch, a gradient wanted, reduction "mean" or "sum": the gradients are formed in the forward (rows gathered a
  chunk at a time, dh written into the (N, H) gradient) and the backward only scales them by grad_output.
- PyTorch otherwise (no gradient wanted, or reduction "none", whose per-token grad_output weights each row): the
  forward only, on the gathered rows; the backward recomputes the gradients with those row weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sftfuse.kernels._registry import CheckContext, CheckResult, max_error, register_check, tolerance, use_triton
from sftfuse.kernels.cross_entropy import linear_cross_entropy_torch


class LossOptions(NamedTuple):
    """The loss options, as every path takes them (as keywords: `**options._asdict()`)."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    logit_scale: float = 1.0


class LCESaved(NamedTuple):
    """What the backward recomputes the gradients from; the autograd Function keeps it with save_for_backward."""

    h: torch.Tensor  # (n, H) the counted rows
    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None  # (V,)
    y: torch.Tensor  # (n,) int64 labels
    lse: torch.Tensor  # (n,) fp32 log-sum-exp
    row_weight: torch.Tensor  # (n,) fp32: each row's weight r_i in the reduced loss
    idx: torch.Tensor | None  # (n,) the counted rows' indices in hidden; None when every row is counted


@dataclass
class LCEState:
    """The forward's decision, for the backward to replay.

    triton: the Triton path ran. formed: the PyTorch path formed the gradients in the forward; `grads` holds them
    ([dh (N, H), dW (V, H), db (V,)] fp32, None where not wanted) until the one backward takes them. needs: (dh, dW,
    db) wanted. rows, hidden_dtype: hidden's row count N and dtype (dh's). options: the loss options.
    """

    triton: bool
    formed: bool
    needs: tuple[bool, bool, bool]
    rows: int
    hidden_dtype: torch.dtype
    options: LossOptions
    grads: list | None = None


def linear_cross_entropy_forward(hidden, weight, bias, y, idx, row_weight, *, options: LossOptions, reduction: str,
                                 needs: tuple[bool, bool, bool]):
    """Per-row loss of the counted rows, the path decided once (module docstring). No autograd.

    Args:
        hidden: (N, H) all rows, in weight's dtype. weight: (V, H). bias: (V,) or None.
        y: (n,) int64 labels of the counted rows. idx: (n,) their rows in hidden, or None (all N counted).
        row_weight: (n,) fp32 weight r_i of each row's loss in the reduced loss (1 for "sum" and "none").
        options: the loss options. reduction: "mean", "sum" or "none". needs: (dh, dW, db) wanted.
    Returns:
        loss (n,) fp32 (unweighted), lse (n,) fp32, hit (n,) bool (the label's logit is the largest), the tensors
        the backward recomputes from (an LCESaved, None when the gradients were formed here), and the LCEState.
    """
    triton = use_triton(hidden, weight)
    formed = not triton and reduction != "none" and any(needs)
    state = LCEState(triton, formed, tuple(needs), hidden.shape[0], hidden.dtype, options)
    kw = options._asdict()
    if formed:  # rows gathered a chunk at a time, dh written straight into an (N, H) gradient
        need_dh, need_dw, need_db = needs
        loss, lse, hit, dh, dw, db = linear_cross_entropy_torch(
            hidden, weight, bias, y, row_weight, rows_idx=idx, need_dh=need_dh, need_dw=need_dw, need_db=need_db, **kw)
        state.grads = [dh, dw, db]  # fp32, owned: the backward scales them in place and hands them over
        return loss, lse, hit, None, state
    h = hidden if idx is None else hidden.index_select(0, idx)  # counted rows only
    if triton:
        loss, lse, hit = lce_fwd_triton(h, weight, bias, y, **kw)
    else:
        loss, lse, hit, *_ = linear_cross_entropy_torch(h, weight, bias, y, None, **kw)
    return loss, lse, hit, LCESaved(h, weight, bias, y, lse, row_weight, idx), state


def linear_cross_entropy_backward(state: LCEState, saved: LCESaved | None, grad_out: torch.Tensor) -> list:
    """[dh (N, H) in hidden's dtype, dW (V, H) fp32, db (V,) fp32] for grad_out (0-dim, or (n,) per counted row for
    reduction "none"), replaying the forward's path; None where not formed. No autograd."""
    if state.formed:
        if state.grads is None:
            raise RuntimeError("linear_cross_entropy: backward ran twice; its gradients were handed over")
        grads, state.grads = state.grads, None
        if not (grad_out == 1).all():
            g = grad_out.float()
            grads = [t.mul_(g) if t is not None else None for t in grads]
    else:
        grads = _recompute_grads(state, saved, grad_out)
    if grads[0] is not None:
        grads[0] = grads[0].to(state.hidden_dtype)
    return grads


def _recompute_grads(state: LCEState, saved: LCESaved, grad_out: torch.Tensor) -> list:
    """The gradients recomputed from the saved rows on the forward's path; dh scattered back to hidden's N rows."""
    need_dh, need_dw, need_db = state.needs
    kw = state.options._asdict()
    row_weight = saved.row_weight * grad_out.float()  # per-row upstream gradient for "none", a scalar otherwise
    if state.triton:
        grads = lce_bwd_triton(saved.h, saved.weight, saved.bias, saved.y, saved.lse, row_weight, need_dw=need_dw,
                               need_db=need_db, **kw)
    else:
        grads = linear_cross_entropy_torch(saved.h, saved.weight, saved.bias, saved.y, row_weight, need_dh=need_dh,
                                           need_dw=need_dw, need_db=need_db, **kw)[3:]
    grads = list(grads)
    if grads[0] is not None and saved.idx is not None:  # counted rows' gradient into the (N, H) one
        grads[0] = grads[0].new_zeros(state.rows, grads[0].shape[1]).index_copy_(0, saved.idx, grads[0])
    return grads


# ---------------------------------------------------------------------------------------------------------------
# Triton path: launchers of the kernels in cross_entropy_triton.py, imported on first use (the PyTorch path never
# imports Triton)


def _empty(*shape, **kw) -> torch.Tensor:
    return torch.empty(*shape, **kw)  # one place for tests to poison every launcher output


def _check_inputs(h, weight, bias, y):
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"h (n, H) and weight (V, H) expected, got {tuple(h.shape)} and {tuple(weight.shape)}")
    if h.dtype != weight.dtype or h.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"h and weight need one dtype and unit inner stride, got {h.dtype}, {weight.dtype}")
    if y.shape != h.shape[:1] or y.dtype != torch.int64:
        raise ValueError(f"y must be int64 of shape ({h.shape[0]},), got {y.dtype} {tuple(y.shape)}")
    if bias is not None and (bias.shape != weight.shape[:1] or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous of shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def lce_fwd_triton(h, weight, bias, y, *, label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0):
    """Triton forward on counted rows: h (n, H), weight (V, H), y (n,) -> loss (n,), lse (n,) fp32, hit (n,) bool."""
    import triton

    from sftfuse.kernels import cross_entropy_triton as kt

    _check_inputs(h, weight, bias, y)
    (n, H), V = h.shape, weight.shape[0]
    loss, lse = _empty(n, dtype=torch.float32, device=h.device), _empty(n, dtype=torch.float32, device=h.device)
    hit = _empty(n, dtype=torch.int8, device=h.device)
    if n:
        cfg = kt._triton_config(h.dtype, "fwd")
        kt._lce_fwd_kernel[(triton.cdiv(n, cfg["BLOCK_M"]),)](
            h, weight, h if bias is None else bias, y, loss, lse, hit, n, V, H, h.stride(0), weight.stride(0),
            bias is not None, float(label_smoothing), float(z_loss), float(softcap or 0.0), float(logit_scale),
            **cfg)
    return loss, lse, hit.bool()


def lce_bwd_triton(h, weight, bias, y, lse, row_weight, *, label_smoothing=0.0, z_loss=0.0, softcap=None,
                   logit_scale=1.0, need_dw=True, need_db=True, filter_eps=0.0):
    """Triton backward: recomputes logit tiles; row_weight (n,) fp32 = dloss/dloss_i. Returns fp32 dh, dW, db.

    filter_eps > 0 skips the matmuls of tiles whose logit gradients are all below it (exact only when those
    entries are negligible: never with label smoothing, whose -eps/V term is in every entry).
    """
    import triton

    from sftfuse.kernels import cross_entropy_triton as kt

    _check_inputs(h, weight, bias, y)
    (n, H), V = h.shape, weight.shape[0]
    dh = torch.zeros(n, H, dtype=torch.float32, device=h.device)
    dw = torch.zeros(V, H, dtype=torch.float32, device=h.device) if need_dw else None
    db = torch.zeros(V, dtype=torch.float32, device=h.device) if need_db and bias is not None else None
    if n:
        cfg = kt._triton_config(h.dtype, "bwd")
        grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(V, cfg["BLOCK_N"]))
        kt._lce_bwd_kernel[grid](
            h, weight, h if bias is None else bias, y, lse, row_weight.float().contiguous(), dh,
            dh if dw is None else dw, dh if db is None else db, n, V, H, h.stride(0), weight.stride(0),
            bias is not None, float(label_smoothing), float(z_loss), float(softcap or 0.0), float(logit_scale),
            float(filter_eps), COMPUTE_DW=dw is not None, COMPUTE_DB=db is not None, **cfg)
    return dh, dw, db


# ---------------------------------------------------------------------------------------------------------------
# `sftfuse verify`: the Triton path against F.cross_entropy in fp64


def _verify(ctx: CheckContext) -> None:
    shapes = [(2048, 576, 49152), (512, 2048, 128256)] if ctx.large else [(37, 64, 1031), (5, 100, 4099)]
    for dtype in ctx.dtypes:
        for n, H, V in shapes:
            h = torch.randn(n, H, device=ctx.device).to(dtype)
            w = (torch.randn(V, H, device=ctx.device) / H**0.5).to(dtype)
            y = torch.randint(0, V, (n,), device=ctx.device)
            rw = torch.full((n,), 1.0 / n, device=ctx.device)
            loss, lse, _ = lce_fwd_triton(h, w, None, y)
            dh, dw, _ = lce_bwd_triton(h, w, None, y, lse, rw)
            hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
            ref = F.cross_entropy(hr @ wr.t(), y, reduction="none")
            ref_dh, ref_dw = torch.autograd.grad(ref.mean(), [hr, wr])
            for what, ours, want in (("loss", loss, ref), ("grad_hidden", dh, ref_dh), ("grad_weight", dw, ref_dw)):
                ctx.results.append(CheckResult(f"cross_entropy.{what}", "triton", str(dtype).split(".")[-1],
                                               f"{n}x{H}x{V}", max_error(ours, want), tolerance(want.detach(), dtype)))


register_check("cross_entropy", _verify)
