"""The patch-parity guard: before the first optimizer step, the patched model must agree with plain PyTorch.

sftfuse's kernels are tested on grids of shapes, but a run meets one model, one dtype, one machine and one
transformers release, and a swap that is wrong there (a family quirk, a forward that transformers changed under
the patcher, a CPU that picks another GEMM dtype) would train a wrong adapter without a sign. So `sftfuse train`
(`verify_patch=true`, the default) takes the row of the first micro-batch with the most labelled tokens, cut after
`max_tokens` tokens, and runs forward and backward on it three times, in training mode and with every dropout off
(the fused LoRA path draws its masks differently from torch's, so masks could not match):

1. patched, the run's own path: the loss and the gradient of every LoRA A and B;
2. plain PyTorch in the run's dtype: `unpatch_model`, and sftfuse's native `LoRALinear` / `NF4Linear` (which run
   the fused ops even unpatched) temporarily compute their reference math, x W^T + b + s (x A^T) B^T with W the
   run's dequantized weight, by autograd;
3. the same one precision wider (fp32 for a 16-bit run, fp64 for an fp32 one; the loss computed from the wide
   logits, since transformers' loss casts them to fp32): the reference.

Then the model is patched again with the same options, and its gradients and torch's RNG are put back as they were
(a resumed run, which checks again, draws what an uninterrupted one draws). The figures are held to the test
suite's rule with the one tolerance table (`sftfuse.kernels._registry`), in the run's dtype: error <= atol +
rtol * |ref| + 2 * PyTorch's own error (pass 2 against pass 3). The loss is one figure; the gradients are grouped
by kind of layer (every layer's `mlp.down_proj.lora_B` is one group: one op in one place) and measured by L2 norm
relative to the reference's, so that no single rounding decides and gradients of any scale meet the table's atol
on a scale of one. A mismatch raises `PatchParityError` naming the figure, both errors, the tolerance, and the
options `patch=false` and `verify_patch=false`.

Why a wider reference and not just pass 2: a 16-bit model's own error is large and differs from step to step
(SmolLM2-135M in bf16: 6-30% of the gradients' norm against fp32), and only twice that error is a bound that a
correct kernel meets on every model. Measured on SmolLM2-135M (default QLoRA job): bf16, the fused path's error
equals PyTorch's own (the worst group at 0.4-0.6 of its tolerance over the first steps); fp32, the fused path is
closer to fp64 than PyTorch (5e-6 vs 5e-5 of the norm: transformers' fp32 cross-entropy loses digits to
cancellation, the fused one does not).

Cost: three forward+backward passes of one row of at most 128 tokens; on SmolLM2-135M in bf16 on one core of the
development CPU about 2.8 s, against 2.5-3.0 s for a training step of 4 x 256 tokens (most of a pass is fixed:
decoding the NF4 weights, not the tokens).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from sftfuse.kernels._registry import TOLERANCES, tolerance
from sftfuse.kernels.lora import lora_linear_ref
from sftfuse.kernels.nf4 import dequantize_nf4
from sftfuse.modules.linear import LoRALinear, NF4Linear
from sftfuse.patch.patcher import patch_model, unpatch_model
from sftfuse.train.outdir import RunError


class PatchParityError(RunError):
    """The patched model's loss or gradients differ from plain PyTorch's beyond the tolerance table."""


@dataclass
class ParityResult:
    """The figures of one check: the patched model's errors against plain PyTorch one precision wider (`ref_dtype`),
    next to PyTorch's own in the run's dtype. A group's gradient error is relative to its reference's norm."""

    loss: float  # patched
    loss_ref: float  # plain PyTorch in ref_dtype
    loss_err: float  # |loss - loss_ref|
    loss_tol: float
    n_grads: int  # adapter gradients compared
    n_groups: int  # ... in groups of one kind of layer (every layer's mlp.down_proj.lora_B, ...)
    grad_err: float  # the patched model's largest relative error among the groups
    torch_grad_err: float  # plain PyTorch's own in the run's dtype
    worst: str  # the figure closest to (or over) its tolerance: "loss" or a group
    worst_err: float
    worst_tol: float
    ratio: float  # worst_err / worst_tol: over 1 fails
    rows: int
    tokens: int  # labelled tokens in the checked rows
    dtype: str  # the run's
    ref_dtype: str  # the reference's: fp32 for a 16-bit run, fp64 for an fp32 one
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# the reference path


class _ReferenceNF4(torch.autograd.Function):
    """x W^T + b with W = dequant(q) rounded to `wdtype` (the run's weights, whatever x's dtype), in plain PyTorch;
    the backward decodes q again instead of keeping a dense copy of every weight (13 GB for a 7B model)."""

    @staticmethod
    def forward(ctx, x, q, bias, wdtype):
        ctx.q, ctx.wdtype = q, wdtype
        return nn.functional.linear(x, dequantize_nf4(q, wdtype).to(x.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        return dy @ dequantize_nf4(ctx.q, ctx.wdtype).to(dy.dtype), None, None, None


def _reference_forward(module: nn.Module, dtype: torch.dtype | None) -> Callable:
    """The plain-PyTorch forward of an sftfuse LoRALinear or NF4Linear: the same parameters, computed in `dtype`
    (None: the layer's own compute dtype)."""
    base = module.base_layer if isinstance(module, LoRALinear) else module
    lora = module if isinstance(module, LoRALinear) else None

    def forward(x):
        if isinstance(base, NF4Linear):
            xc = x.to(dtype or base.compute_dtype)
            bias = None if base.bias is None else base.bias.to(xc.dtype)
            y = _ReferenceNF4.apply(xc, base.quant, bias, base.compute_dtype)
            if lora is not None:
                y = y + lora.scaling * (xc @ lora.lora_A.to(xc.dtype).T) @ lora.lora_B.to(xc.dtype).T
            return y.to(x.dtype)
        xc = x.to(dtype or base.weight.dtype)
        return lora_linear_ref(xc, base.weight.to(xc.dtype), lora.lora_A.to(xc.dtype), lora.lora_B.to(xc.dtype),
                               lora.scaling, bias=None if base.bias is None else base.bias.to(xc.dtype)).to(x.dtype)

    return forward


@contextlib.contextmanager
def _reference(model: nn.Module, wide: torch.dtype | None):
    """Inside the block sftfuse's native layers compute their reference math (an instance forward each); with
    `wide`, every other floating parameter and buffer is a copy in `wide`, its own storage put back after (NF4
    quant states stay: the reference decodes them to the run's weights)."""
    layers = [m for m in model.modules() if isinstance(m, (LoRALinear, NF4Linear)) and "forward" not in m.__dict__]
    found = itertools.chain(model.parameters(), *(m.buffers(recurse=False) for m in model.modules()
                                                  if not isinstance(m, NF4Linear)))
    narrow = list({id(t): t for t in found if wide is not None and t.is_floating_point() and t.dtype != wide}.values())
    kept = [t.data for t in narrow]
    for m in layers:
        m.forward = _reference_forward(m, wide)
    for t in narrow:
        t.data = t.data.to(wide)
    try:
        yield
    finally:
        for m in layers:
            del m.forward
        for t, data in zip(narrow, kept, strict=True):
            t.data = data


@contextlib.contextmanager
def _dropout_off(model: nn.Module):
    """Inside the block, p = 0 for nn.Dropout, LoRALinear's dropout and attention dropout; restored after."""
    saved = []
    for m in model.modules():
        attr = ("p" if isinstance(m, nn.Dropout) else "lora_dropout" if isinstance(m, LoRALinear)
                else "attention_dropout")
        value = getattr(m, attr, None)
        if isinstance(value, float) and value != 0.0:
            saved.append((m, attr, value))
            setattr(m, attr, 0.0)
    try:
        yield
    finally:
        for m, attr, value in saved:
            setattr(m, attr, value)


# ---------------------------------------------------------------------------------------------------------------
# the check


def _first_rows(batch: dict, rows: int, max_tokens: int, device) -> tuple[dict | None, int]:
    """The `rows` rows of `batch` with the most labelled tokens among their first `max_tokens`, cut after the last
    labelled one, on `device`; their labelled-token count. Cutting a causal row's tail changes nothing before it:
    the packed rows' document masks (B, 1, T, T) are cut on both axes, every other tensor is (B, T)."""
    labelled = batch["labels"][:, :max_tokens] != -100
    counts = labelled[:, 1:].sum(dim=1)
    pick = counts.argsort(descending=True, stable=True)[:rows]
    pick = pick[counts[pick] > 0]
    if pick.numel() == 0:
        return None, 0
    t = int(labelled[pick].any(dim=0).nonzero().max()) + 1
    sub = {k: (v[pick][:, :, :t, :t] if v.dim() == 4 else v[pick][:, :t]).to(device) for k, v in batch.items()
           if torch.is_tensor(v)}
    return sub, int(counts[pick].sum())


def _loss_and_grads(model: nn.Module, batch: dict, tokens: int, adapters: dict[str, nn.Parameter], *,
                    own_loss: bool = False):
    """One forward + backward as the trainer runs it; the loss and fp32 copies of the adapter gradients. With
    `own_loss`, the loss is computed here from the logits in their dtype, as transformers' causal-LM loss
    (labels shifted left, -100 ignored, sum / tokens), because that loss casts the logits to fp32 first."""
    if own_loss:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        labels = batch["labels"][:, 1:].reshape(-1)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels, reduction="sum") / tokens
    else:
        n_items = torch.tensor(float(tokens), device=batch["labels"].device)
        loss = model(**batch, num_items_in_batch=n_items, use_cache=False).loss
    loss.backward()
    grads = {n: torch.zeros(p.shape, device=p.device) if p.grad is None else p.grad.detach().float().clone()
             for n, p in adapters.items()}
    for p in model.parameters():
        p.grad = None
    return float(loss.detach()), grads


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _passes(model, sub, tokens, adapters, *, dtype, patch_options):
    """(patched, plain PyTorch in `dtype`, plain PyTorch one precision wider) losses and gradients. The model
    comes back patched, in its own dtypes, without gradients."""
    cuda = [sub["labels"].device] if sub["labels"].is_cuda else []
    wide = _wide(dtype)
    with torch.random.fork_rng(devices=cuda), _dropout_off(model):  # the run's RNG stream stays as it was
        try:
            ours = _loss_and_grads(model, sub, tokens, adapters)
            unpatch_model(model)
            with _reference(model, None):
                same = _loss_and_grads(model, sub, tokens, adapters)
            with _reference(model, wide):
                sub = {k: v.to(wide) if v.is_floating_point() else v for k, v in sub.items()}  # the 4-D mask
                truth = _loss_and_grads(model, sub, tokens, adapters, own_loss=True)
        finally:
            patch_model(model, **(patch_options or {}))
    return ours, same, truth


def check_patch_parity(model: nn.Module, batch: dict, *, patch_options: dict | None = None, rows: int = 1,
                       max_tokens: int = 128, dtype: torch.dtype | None = None,
                       log: Callable[[str], None] | None = None,
                       all_ok: Callable[[bool], bool] | None = None,
                       params: dict[str, nn.Parameter] | None = None) -> ParityResult | None:
    """Compare the patched `model`'s loss and adapter gradients on `batch` with plain PyTorch's; see the module doc.

    Args:
        model: a patched `*ForCausalLM` holding sftfuse LoRALinear adapters (as `sftfuse train` builds it).
        batch: a collated micro-batch (input_ids, labels, position_ids, attention_mask: (B, ...)); the `rows`
            rows with the most labelled tokens among their first `max_tokens` are checked, that far.
        patch_options: the keyword arguments `patch_model` was called with, to patch again after the check.
        dtype: the compute dtype whose row of the tolerance table applies (default: the embedding's dtype).
        log: called with one line on success.
        all_ok: under several processes, True on every process when its argument is True on every process
            (`Control.all_ok`), so that all of them stop when one check fails.
        params: the trained parameters whose gradients are compared, by name (issue 19: a mode's, e.g. PEFT's
            DoRA tensors or a sample of a full fine-tune's weights); default every LoRALinear's lora_A and lora_B.

    Returns:
        The figures, or None when no row of `batch` carries a label or the reference loss is not finite.

    Raises:
        PatchParityError: the loss or a gradient differs beyond the tolerance (naming it and how to skip).
    """
    t0 = time.perf_counter()
    sub, tokens = _first_rows(batch, rows, max_tokens, next(model.parameters()).device)
    if sub is None:
        return None
    dtype = dtype or model.get_input_embeddings().weight.dtype
    adapters = params if params is not None else {
        f"{n}.{part}": getattr(m, part) for n, m in model.named_modules() if isinstance(m, LoRALinear)
        for part in ("lora_A", "lora_B")}
    params = [p for p in model.parameters() if p.requires_grad]
    kept, training = [p.grad for p in params], model.training
    for p in params:
        p.grad = None
    model.train()  # the patched loss path runs in training mode only
    try:
        ours, same, truth = _passes(model, sub, tokens, adapters, dtype=dtype, patch_options=patch_options)
    finally:
        model.train(training)
        for p, g in zip(params, kept, strict=True):
            p.grad = g
    log = log or (lambda msg: None)
    if not math.isfinite(truth[0]):  # the data or the weights, not a kernel: the finite-loss guard's business
        log(f"patch parity: not checked, plain PyTorch's loss on the first batch is {truth[0]}")
        return None
    res = _compare(ours, same, truth, dtype=dtype, rows=sub["labels"].shape[0], tokens=tokens,
                   all_ok=all_ok or (lambda ok: ok))
    res.seconds = time.perf_counter() - t0
    log(f"patch parity: loss and {res.n_grads} gradients of trained weights ({res.n_groups} groups) within tolerance "
        f"(largest error {res.grad_err:.1e} of {res.ref_dtype} PyTorch's gradient norm, PyTorch's own in {res.dtype} "
        f"{res.torch_grad_err:.1e}; {res.worst} at {res.ratio:.2f} of its tolerance; {res.rows} row(s), "
        f"{res.tokens} tokens, {res.seconds:.1f} s)")
    return res


def _group(name: str) -> str:
    """'model.layers.7.mlp.down_proj.lora_B' -> 'model.layers.*.mlp.down_proj.lora_B': one op in one kind of layer."""
    return re.sub(r"\.\d+\.", ".*.", name)


def _figures(ours, same, truth, dtype: torch.dtype) -> dict[str, tuple[float, float, float]]:
    """name -> (patched error, PyTorch's own error in `dtype`, tolerance) for the loss and each group of gradients.

    The table's rule, error <= atol + rtol * |ref| + 2 * PyTorch's own error, with a group's gradients measured by
    their L2 norm relative to the reference's: in a sum over thousands of entries no single rounding decides, and
    gradients, which scale with the model, meet the table's atol on a scale of one.
    """
    (loss, grads), (loss_same, grads_same), (loss_ref, grads_ref) = ours, same, truth
    base = abs(loss_same - loss_ref)
    out = {"loss": (abs(loss - loss_ref), base, tolerance(torch.tensor(loss_ref), dtype, baseline_err=base))}
    sums: dict[str, list[float]] = {}
    for n, ref in grads_ref.items():
        ref = ref.double()
        s = sums.setdefault(_group(n), [0.0, 0.0, 0.0])
        s[0] += float((grads[n].double() - ref).square().sum())
        s[1] += float((grads_same[n].double() - ref).square().sum())
        s[2] += float(ref.square().sum())
    atol, rtol = TOLERANCES[dtype]
    for g, (err2, base2, ref2) in sums.items():
        if ref2 == 0:  # LoRA A's gradients while B is still 0: exactly zero on every path
            out[g] = (0.0 if err2 == 0 else math.inf, 0.0, atol + rtol)
        else:
            err, base = math.sqrt(err2 / ref2), math.sqrt(base2 / ref2)
            out[g] = (err, base, atol + rtol + 2 * base)
    return {n: (e if math.isfinite(e) else math.inf, b, t) for n, (e, b, t) in out.items()}


def _compare(ours, same, truth, *, dtype: torch.dtype, rows: int, tokens: int, all_ok) -> ParityResult:
    figures = _figures(ours, same, truth, dtype)
    ratios = {n: e / t for n, (e, _, t) in figures.items()}
    worst = max(ratios, key=ratios.get)
    grads = [f for n, f in figures.items() if n != "loss"]
    res = ParityResult(loss=ours[0], loss_ref=truth[0], loss_err=figures["loss"][0], loss_tol=figures["loss"][2],
                       n_grads=len(truth[1]), n_groups=len(grads), grad_err=max((f[0] for f in grads), default=0.0),
                       torch_grad_err=max((f[1] for f in grads), default=0.0), worst=worst,
                       worst_err=figures[worst][0], worst_tol=figures[worst][2], ratio=ratios[worst], rows=rows,
                       tokens=tokens, dtype=_name(dtype), ref_dtype=_name(_wide(dtype)), seconds=0.0)
    if all_ok(res.ratio <= 1.0):  # every process stops, or none: one alone would leave the others hanging
        return res
    err, base, tol = figures[worst]
    if res.ratio <= 1.0:
        what = "another process's check failed (its log names the tensor)"
    elif worst == "loss":
        what = (f"the loss is {res.loss:.6g} patched vs {res.loss_ref:.6g} in {res.ref_dtype} PyTorch: |diff| "
                f"{err:.3g}, PyTorch's own in {res.dtype} {base:.3g}")
    else:
        what = (f"the gradients {worst} differ from {res.ref_dtype} PyTorch's by {err:.3g} of their norm, "
                f"PyTorch's own in {res.dtype} by {base:.3g} (loss {res.loss:.6g} patched vs {res.loss_ref:.6g})")
    raise PatchParityError(
        f"patch parity check failed on the first batch ({res.dtype}, {rows} row(s), {tokens} tokens): {what}; "
        f"tolerance {tol:.3g}. A fused kernel computes something other than PyTorch on this model and machine; "
        "please report it with the output of `sftfuse verify`. To train anyway: patch=false (unpatched, slower) "
        "or verify_patch=false (skip this check).")
