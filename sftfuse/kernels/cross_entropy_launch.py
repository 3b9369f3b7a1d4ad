"""Launchers of linear + cross-entropy and the op's one Triton-or-PyTorch decision (the math, the reference and the
PyTorch path: `cross_entropy.py`; the Triton kernels and their launch plan: `cross_entropy_triton.py`).

`linear_cross_entropy_forward` decides once per call; `linear_cross_entropy_backward` replays that decision from the
`LCEState` it returned. Both paths run one algorithm: counted rows only, a chunk of rows at a time.
- A gradient wanted, reduction "mean" or "sum": the gradients are formed in the forward (grad_output is one scalar,
  applied in the backward), so every logit is formed once: 4 n H V FLOPs for a frozen head, 6 for a trained one.
  PyTorch: rows gathered a chunk at a time, dh written into the (N, H) gradient. Triton (CUDA tensors, or
  SFTFUSE_BACKEND=triton): the counted rows gathered once, then per chunk the stats kernel (fp32 logits kept),
  the gradient kernel (in place), dh = g W on cuBLAS and dW on `_lce_dw_kernel`.
- Otherwise (no gradient wanted, or reduction "none", whose per-token grad_output weights each row): the forward
  only (Triton: the stats kernel over all rows, no logits kept); the backward recomputes the gradients with those
  row weights on the same path.
No host sync on the Triton path beyond the caller's one `nonzero`: no `.item()`, no data-dependent branch.
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

    triton: the Triton path ran. formed: the gradients were formed in the forward; `grads` holds them
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
    formed = reduction != "none" and any(needs)
    state = LCEState(triton, formed, tuple(needs), hidden.shape[0], hidden.dtype, options)
    kw = options._asdict()
    need_dh, need_dw, need_db = needs
    if formed and not triton:  # rows gathered a chunk at a time, dh written straight into an (N, H) gradient
        loss, lse, hit, dh, dw, db = linear_cross_entropy_torch(
            hidden, weight, bias, y, row_weight, rows_idx=idx, need_dh=need_dh, need_dw=need_dw, need_db=need_db, **kw)
        state.grads = [dh, dw, db]  # fp32, owned: the backward scales them in place and hands them over
        return loss, lse, hit, None, state
    h = hidden if idx is None else hidden.index_select(0, idx)  # counted rows only
    if formed:
        loss, lse, hit, dh, dw, db = lce_grads_triton(h, weight, bias, y, row_weight, need_dh=need_dh,
                                                      need_dw=need_dw, need_db=need_db, **kw)
        state.grads = [_to_rows(dh, idx, state.rows), dw, db]
        return loss, lse, hit, None, state
    if triton:
        loss, lse, hit = lce_fwd_triton(h, weight, bias, y, **kw)
    else:
        loss, lse, hit, *_ = linear_cross_entropy_torch(h, weight, bias, y, None, **kw)
    return loss, lse, hit, LCESaved(h, weight, bias, y, lse, row_weight, idx), state


def _to_rows(dh, idx, rows):
    """The counted rows' gradient (n, H) into hidden's (N, H) (None stays None)."""
    if dh is None or idx is None:
        return dh
    return dh.new_zeros(rows, dh.shape[1]).index_copy_(0, idx, dh)


def linear_cross_entropy_backward(state: LCEState, saved: LCESaved | None, grad_out: torch.Tensor) -> list:
    """[dh (N, H) in hidden's dtype, dW (V, H) fp32, db (V,) fp32] for grad_out (0-dim, or (n,) per counted row for
    reduction "none"), replaying the forward's path; None where not formed. No autograd."""
    if state.formed:
        if state.grads is None:
            raise RuntimeError("linear_cross_entropy: backward ran twice; its gradients were handed over")
        grads, state.grads = state.grads, None
        if state.triton or not (grad_out == 1).all():  # no data-dependent branch (a host sync) on the Triton path
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
        grads = lce_grads_triton(saved.h, saved.weight, saved.bias, saved.y, row_weight, need_dh=need_dh,
                                 need_dw=need_dw, need_db=need_db, **kw)[3:]
    else:
        grads = linear_cross_entropy_torch(saved.h, saved.weight, saved.bias, saved.y, row_weight, need_dh=need_dh,
                                           need_dw=need_dw, need_db=need_db, **kw)[3:]
    return [_to_rows(grads[0], saved.idx, state.rows), *grads[1:]]


# ---------------------------------------------------------------------------------------------------------------
# Triton path: launchers of the kernels in cross_entropy_triton.py, imported on first use (the PyTorch path never
# imports Triton). Launch decisions come from `lce_plan` alone.


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


def _sms(device: torch.device) -> int:
    from sftfuse.kernels import cross_entropy_triton as kt

    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else kt.SMS


def _stats_launch(kt, plan, h, weight, bias, y, zbuf, *, softcap, logit_scale):
    """The stats kernel over rows h (c, H) (and their fp32 logits into zbuf when given): (4, splits, c) fp32."""
    c = h.shape[0]
    stats = torch.empty(4, plan.splits, c, dtype=torch.float32, device=h.device)
    cfg = plan.stats
    grid = (-(-c // cfg["BLOCK_M"]) * plan.splits,)
    kt._lce_stats_kernel[grid](
        h, weight, h if bias is None else bias, y, stats if zbuf is None else zbuf, stats, c, plan.V, plan.H,
        h.stride(0), weight.stride(0), 0 if zbuf is None else zbuf.stride(0), plan.tiles_per_split, plan.splits,
        bias is not None, float(softcap or 0.0), float(logit_scale), STORE_Z=zbuf is not None, **cfg)
    return stats


def _merge(stats, y, V, *, label_smoothing, z_loss):
    """Per-slice statistics (4, splits, c) -> loss, lse (c,) fp32 and hit (c,) bool, on the device (no sync).
    A label outside [0, V) (not checked on this path: that check would be a host sync) gives a NaN loss."""
    m, s, zy, zsum = stats
    mx = m.amax(0)
    lse = (s * (m - mx).exp_()).sum(0).log_().add_(mx)
    zy, zsum = zy.sum(0), zsum.sum(0)
    eps = label_smoothing
    loss = (lse - zy) * (1.0 - eps) + z_loss * lse.square()
    if eps:
        loss += eps * (lse - zsum / V)
    loss = loss.masked_fill_((y < 0) | (y >= V), float("nan"))
    return loss, lse, zy >= mx


def lce_fwd_triton(h, weight, bias, y, *, label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0):
    """Triton forward on counted rows, loss only: h (n, H), weight (V, H), y (n,) -> loss (n,), lse (n,) fp32,
    hit (n,) bool. One launch over (row blocks x vocabulary slices), then the slices' log-sum-exp merge."""
    from sftfuse.kernels import cross_entropy_triton as kt

    _check_inputs(h, weight, bias, y)
    (n, H), V = h.shape, weight.shape[0]
    if n == 0:
        return (_empty(0, dtype=torch.float32, device=h.device), _empty(0, dtype=torch.float32, device=h.device),
                _empty(0, dtype=torch.bool, device=h.device))
    plan = kt.lce_plan(n, V, H, h.dtype, grads=False, sms=_sms(h.device))
    stats = _stats_launch(kt, plan, h, weight, bias, y, None, softcap=softcap, logit_scale=logit_scale)
    return _merge(stats, y, V, label_smoothing=label_smoothing, z_loss=z_loss)


def lce_grads_triton(h, weight, bias, y, row_weight, *, label_smoothing=0.0, z_loss=0.0, softcap=None,
                     logit_scale=1.0, need_dh=True, need_dw=True, need_db=True):
    """Triton loss and gradients on counted rows, a chunk of rows at a time (`lce_plan`): the stats kernel keeps the
    chunk's fp32 logits, the gradient kernel turns them into dloss/dz in place, then dh = g W (cuBLAS) and
    dW [+]= g^T h (`_lce_dw_kernel`), db += column sums of g. row_weight (n,) fp32 = dloss/dloss_i.

    Returns loss, lse (n,) fp32, hit (n,) bool, dh (n, H) in h's dtype (fp32 in the interpreter), dW (V, H) fp32,
    db (V,) fp32 (None where not asked for).
    """
    from sftfuse.kernels import cross_entropy_triton as kt

    _check_inputs(h, weight, bias, y)
    (n, H), V = h.shape, weight.shape[0]
    dev, f32 = h.device, torch.float32
    plan = kt.lce_plan(n, V, H, h.dtype, grads=True, need_dw=need_dw, sms=_sms(dev))
    upcast = plan.stats["UPCAST"]  # the interpreter: gradient and GEMMs in fp32 (its bf16 arithmetic is wrong)
    gdtype = f32 if upcast else h.dtype
    loss, lse = _empty(n, dtype=f32, device=dev), _empty(n, dtype=f32, device=dev)
    hit = _empty(n, dtype=torch.bool, device=dev)
    dh = _empty(n, H, dtype=gdtype, device=dev) if need_dh else None
    dw = (_empty(V, H, dtype=f32, device=dev) if n else torch.zeros(V, H, dtype=f32, device=dev)) if need_dw else None
    db = torch.zeros(V, dtype=f32, device=dev) if need_db and bias is not None else None
    if n == 0:
        return loss, lse, hit, dh, dw, db
    ldz = -(-V // 16) * 16  # 16-aligned rows: vector loads, and a 16-bit view of them for cuBLAS
    zbuf = torch.empty(plan.rows, ldz, dtype=f32, device=dev)
    gbuf = zbuf if gdtype == f32 else zbuf.view(gdtype)  # the gradient over each fp32 row's first half
    w_mm = weight.float() if upcast and weight.dtype != f32 else weight
    row_weight = row_weight.float().contiguous()
    for i, s in enumerate(range(0, n, plan.rows)):
        e = min(s + plan.rows, n)
        hc, yc = h[s:e], y[s:e]
        stats = _stats_launch(kt, plan, hc, weight, bias, yc, zbuf, softcap=softcap, logit_scale=logit_scale)
        loss[s:e], lse[s:e], hit[s:e] = _merge(stats, yc, V, label_smoothing=label_smoothing, z_loss=z_loss)
        g = gbuf[: e - s, :V]
        kt._lce_grad_kernel[(e - s,)](zbuf, g, yc, lse[s:e], row_weight[s:e], e - s, V, zbuf.stride(0), g.stride(0),
                                      float(label_smoothing), float(z_loss), float(softcap or 0.0),
                                      float(logit_scale), **plan.grad)
        if dh is not None:
            torch.mm(g, w_mm, out=dh[s:e])
        if dw is not None:
            kt._lce_dw_kernel[plan.dw_grid](g, hc, dw, e - s, V, H, g.stride(0), hc.stride(0), FIRST=i == 0,
                                            **plan.dw)
        if db is not None:
            db += g.sum(0, dtype=f32)
    return loss, lse, hit, dh, dw, db


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
            loss, _, _ = lce_fwd_triton(h, w, None, y)
            dh, dw = lce_grads_triton(h, w, None, y, rw)[3:5]
            hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
            ref = F.cross_entropy(hr @ wr.t(), y, reduction="none")
            ref_dh, ref_dw = torch.autograd.grad(ref.mean(), [hr, wr])
            for what, ours, want in (("loss", loss, ref), ("grad_hidden", dh, ref_dh), ("grad_weight", dw, ref_dw)):
                ctx.results.append(CheckResult(f"cross_entropy.{what}", "triton", str(dtype).split(".")[-1],
                                               f"{n}x{H}x{V}", max_error(ours, want), tolerance(want.detach(), dtype)))


register_check("cross_entropy", _verify)
