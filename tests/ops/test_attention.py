"""CPU attention's scores path (`sftfuse.kernels.attention`, mode "scores"): against fp64, what it keeps, when
it applies.

Shapes: batch 2, 6 query heads, 37 queries (odd: no size is a multiple of a block) against 37 or 41 keys, head_dim
24; the grouped cases fold 2 or 3 query heads onto each key/value head.
"""

from __future__ import annotations

import pytest
import torch

from sftfuse.kernels import attention as kattn
from sftfuse.kernels.attention import attention_ref
from sftfuse.ops.attention import scaled_dot_product_attention
from tests.helpers import assert_close, randn

# name: (key/value heads, keys, options, mask kind)
_CASES = {
    "causal_gqa3": (2, 37, dict(is_causal=True, enable_gqa=True), None),
    "causal_mha": (6, 37, dict(is_causal=True), None),
    "no_mask_gqa2_more_keys": (3, 41, dict(enable_gqa=True, scale=0.3), None),
    "bool_padding_per_row": (6, 37, {}, "bool"),  # (B, 1, T, S): the mask a padded batch gets
    "bool_with_dead_rows": (3, 37, dict(enable_gqa=True), "dead"),  # rows whose keys are all masked: zeros
    "float_per_head": (6, 37, {}, "float_heads"),  # (B, Hq, T, S) additive bias with dtype-min holes
    "float_2d_shared": (2, 41, dict(enable_gqa=True), "float_2d"),  # (T, S): one bias for every row and head
}


def _inputs(dtype, case):
    hk, s, opts, mask = _CASES[case]
    opts = dict(opts)
    q = randn(2, 6, 37, 24, dtype=dtype, requires_grad=True)
    k, v = (randn(2, hk, s, 24, dtype=dtype, requires_grad=True) for _ in range(2))
    if mask in ("bool", "dead"):
        m = (torch.rand(2, 1, 37, s) > 0.3) | torch.eye(37, s, dtype=torch.bool)
        if mask == "dead":
            m[0, 0, 5] = m[1, 0, 36] = False
        opts["attn_mask"] = m
    elif mask == "float_heads":
        holes = (torch.rand(2, 6, 37, s) < 0.3) & ~torch.eye(37, s, dtype=torch.bool)
        opts["attn_mask"] = randn(2, 6, 37, s, scale=0.5).masked_fill(holes, torch.finfo(dtype).min).to(dtype)
    elif mask == "float_2d":
        opts["attn_mask"] = randn(37, s, scale=0.5).to(dtype)
    return (q, k, v), opts


def _fp64(q, k, v, dy, opts):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask = opts.get("attn_mask")
    y = attention_ref(*leaves, attn_mask=mask, is_causal=opts.get("is_causal", False), scale=opts.get("scale"))
    return [y.detach(), *torch.autograd.grad(y, leaves, dy.double())]


@pytest.mark.parametrize("case", list(_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scores_path_matches_fp64(dtype, case, monkeypatch):
    """Output and the three gradients within twice torch's own error in the same dtype (its function, on the same
    inputs) of the fp64 reference; rows with no key come out zero, with zero gradients, and nothing is NaN."""
    monkeypatch.setenv("SFTFUSE_CPU_ATTENTION", "scores")
    (q, k, v), opts = _inputs(dtype, case)
    dy = randn(*q.shape, dtype=dtype)
    y = scaled_dot_product_attention(q, k, v, **opts)
    grads = torch.autograd.grad(y, (q, k, v), dy)
    refs = _fp64(q, k, v, dy, opts)
    yt = torch.nn.functional.scaled_dot_product_attention(q, k, v, **opts)
    base = [yt, *torch.autograd.grad(yt, (q, k, v), dy)]
    for name, ours, ref, b in zip(("y", "dq", "dk", "dv"), (y, *grads), refs, base, strict=True):
        assert ours.dtype == dtype and ours.shape == ref.shape, name
        assert not ours.isnan().any(), name
        assert_close(ours, ref, baseline=b.detach().nan_to_num(), name=name)
    if _CASES[case][3] == "dead":
        assert y[0, :, 5].eq(0).all() and y[1, :, 36].eq(0).all() and grads[0][0, :, 5].eq(0).all()


@pytest.mark.parametrize("spread,tokens", [(6.0, 37), (10.0, 37), (4.0, 128)])
def test_sharp_attention_is_as_precise_as_torchs(monkeypatch, spread, tokens):
    """Logits with a spread of 4-10 (q scaled up), causal, 3 query heads per key/value head: output and gradients
    within 2x torch's own bf16 error + max|ref| / 256 of fp64, tighter than the tolerance table. Scores rounded to
    bf16 before the softmax, as HF's eager attention rounds them, missed this by 2-3x (output errors 0.04-0.08
    against torch's 0.008-0.011); the scores path keeps them in fp32."""
    monkeypatch.setenv("SFTFUSE_CPU_ATTENTION", "scores")
    q = randn(2, 6, tokens, 24, dtype=torch.bfloat16, scale=spread, requires_grad=True)
    k, v = (randn(2, 2, tokens, 24, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    dy = randn(*q.shape, dtype=torch.bfloat16)
    opts = dict(is_causal=True, enable_gqa=True)
    y = scaled_dot_product_attention(q, k, v, **opts)
    ours = [y, *torch.autograd.grad(y, (q, k, v), dy)]
    yt = torch.nn.functional.scaled_dot_product_attention(q, k, v, **opts)
    theirs = [yt, *torch.autograd.grad(yt, (q, k, v), dy)]
    for name, a, b, ref in zip(("y", "dq", "dk", "dv"), ours, theirs, _fp64(q, k, v, dy, opts), strict=True):
        err, base = (a.detach().double() - ref).abs().max(), (b.detach().double() - ref).abs().max()
        assert err <= 2 * base + ref.abs().max() / 256, (name, err.item(), base.item())


def test_scores_path_keeps_its_inputs_and_the_probabilities(monkeypatch):
    """Kept for the backward: q, k, v as given and one 16-bit (B Hkv, G T, S) probability tensor; nothing fp32."""
    monkeypatch.setenv("SFTFUSE_CPU_ATTENTION", "scores")
    (q, k, v), opts = _inputs(torch.bfloat16, "causal_gqa3")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = scaled_dot_product_attention(q, k, v, **opts)
    assert y.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in saved)
    inputs = [t for t in saved if t.dim() == 4]
    assert sorted(t.data_ptr() for t in inputs) == sorted(t.data_ptr() for t in (q, k, v))
    probs = [t for t in saved if t.dim() == 3]
    assert [tuple(t.shape) for t in probs] == [(2 * 2, 3 * 37, 37)]
    assert torch.allclose(probs[0].float().sum(-1), torch.ones(4, 111), atol=1e-2)  # rows of a softmax


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_a_mask_folded_once_serves_every_layer_until_it_changes(monkeypatch, kind):
    """The same mask object in two calls (as a model's layers get it) gives the same answer as a fresh copy of it;
    changed in place between calls, the new values count (the fold is redone, not reused)."""
    monkeypatch.setenv("SFTFUSE_CPU_ATTENTION", "scores")
    (q, k, v), opts = _inputs(torch.bfloat16, "bool_padding_per_row")
    mask = opts["attn_mask"] if kind == "bool" else torch.zeros(2, 1, 37, 37).masked_fill(
        ~opts["attn_mask"], torch.finfo(torch.float32).min)
    first = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(scaled_dot_product_attention(q, k, v, attn_mask=mask), first)
    assert torch.equal(scaled_dot_product_attention(q, k, v, attn_mask=mask.clone()), first)
    if kind == "bool":
        mask[:, :, :, 20:] = False
    else:
        mask[:, :, :, 20:] = torch.finfo(torch.float32).min
    changed = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(changed, scaled_dot_product_attention(q, k, v, attn_mask=mask.clone()))
    assert not torch.equal(changed, first)


def test_scores_that_do_not_fit_take_flash_in_fp32(monkeypatch):
    """Past SCORES_MAX_BYTES (P per call) the forced scores mode takes the fp32 flash path: its saved fp32 output
    and log-sum-exp show it."""
    monkeypatch.setenv("SFTFUSE_CPU_ATTENTION", "scores")
    (q, k, v), opts = _inputs(torch.bfloat16, "causal_gqa3")
    monkeypatch.setattr(kattn, "SCORES_MAX_BYTES", 2 * 6 * 37 * 37 * 2 - 1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        scaled_dot_product_attention(q, k, v, **opts)
    assert sorted(tuple(t.shape) for t in saved if t.dtype == torch.float32) == [(2, 6, 37), (2, 6, 37, 24)]


@pytest.mark.parametrize("mode", ["scores", "fp32"])
@pytest.mark.parametrize("why", ["causal_and_mask", "heads_do_not_fold", "mask_rows_differ"])
def test_calls_the_scores_path_cannot_take_answer_as_torch(monkeypatch, why, mode):
    """A mask with is_causal, 6 query heads over 4 key/value heads, a mask whose rows are not (T, S): torch's own
    answer, its error included (the flash fallback where torch has one). 6 over 4 heads once went to the fp32 flash
    kernel, which answered without an error."""
    monkeypatch.setenv("SFTFUSE_CPU_ATTENTION", mode)
    (q, k, v), opts = _inputs(torch.bfloat16, "causal_mha")
    if why == "causal_and_mask":
        opts["attn_mask"] = torch.ones(37, 37, dtype=torch.bool)
    elif why == "heads_do_not_fold":
        k, v, opts = k[:, :4], v[:, :4], dict(opts, enable_gqa=True)
    else:
        opts = {"attn_mask": torch.ones(2, 1, 1, 37, dtype=torch.bool)}  # broadcast over queries: flash's business
    try:
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, **opts)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            scaled_dot_product_attention(q, k, v, **opts)
        return
    ours = scaled_dot_product_attention(q, k, v, **opts)
    ref = attention_ref(q.detach(), k.detach(), v.detach(), attn_mask=opts.get("attn_mask"))
    assert_close(ours.detach(), ref, baseline=theirs.detach())
