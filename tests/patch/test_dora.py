"""PEFT's DoRA under patch_model: left to PEFT, reported, never computed as plain LoRA (issue 19).

DoRA scales each output row of W + s B A by m / ||W + s B A||_row; the fused `lora_linear` computes W x + s B A x,
so swapping a DoRA layer as plain LoRA would train and evaluate another model without a sign. Tiny Llama (hidden 64,
2 layers, vocab 1031), fp32, 2 x 24 tokens with masked prompts and a padded row (tests/patch/common.py).
"""

from __future__ import annotations

import copy

import torch

from sftfuse.patch.patcher import is_patched, patch_model
from tests.patch.common import lora_model, sft_batch, train


def _dora_linears(model):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_magnitude_vector") and m.lora_magnitude_vector]


def test_dora_layers_are_left_to_peft_and_the_rest_still_trains_the_same():
    """Loss, RMSNorm and attention swapped; DoRA linears and the MLPs made of them reported as left to PEFT; the
    losses of 4 AdamW steps match the unpatched model's."""
    ref = lora_model("llama", use_dora=True)
    model = copy.deepcopy(ref)
    report = patch_model(model)
    dora = _dora_linears(model)
    assert dora and not any(is_patched(m) for _, m in dora)
    skipped = {e.name.removeprefix("base_model.model."): e.reason for e in report.skipped}
    for name, _ in dora:
        assert "DoRA" in skipped[name.removeprefix("base_model.model.")], skipped
    assert any(e.kind == "mlp" and "DoRA" in e.reason for e in report.skipped)
    assert {e.kind for e in report.swapped} >= {"cross_entropy", "rms_norm", "attention"}
    batches = [[sft_batch(seed=s)] for s in range(2)]
    (ours, ours_w), (theirs, theirs_w) = train(model, batches), train(ref, batches)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert any("lora_magnitude_vector" in n for n in ours_w)
    for n, w in ours_w.items():  # magnitudes, A and B after the steps
        torch.testing.assert_close(w, theirs_w[n], rtol=1e-4, atol=1e-6)


def test_dora_without_peft_variant_bookkeeping_is_not_swapped_as_plain_lora():
    """PEFT before 0.15 marked DoRA with `use_dora` and the magnitude vector only (no `lora_variant`); the lora
    check looked at `lora_variant` alone and swapped such a layer as plain LoRA, dropping m / ||W + s B A||."""
    model = lora_model("llama", use_dora=True)
    for _, m in _dora_linears(model):
        m.lora_variant = {}  # what an older PEFT's layer looks like to the check
        m.use_dora = {"default": True}
    report = patch_model(model)
    assert not any(is_patched(m) for _, m in _dora_linears(model))
    assert all("DoRA" in e.reason for e in report.skipped if e.kind == "lora")
