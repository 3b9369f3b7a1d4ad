"""patch_model / unpatch_model on tiny Hugging Face models of every supported family.

What must hold: a patched model trains exactly like the unpatched one (losses per step, final adapter weights),
under plain loops, gradient accumulation with `num_items_in_batch`, HF Trainer, TRL SFTTrainer, DDP and FSDP2; eval,
`generate()` and unpatching are bit-for-bit the original; nothing global changes.

Shapes: tiny configs from `sftfuse.train.models.tiny_config` (hidden 64, 2 layers, vocab 1031 = prime, so every
tile is partial), batches of 2 x 24 tokens with different prompt lengths and a right-padded row, so masked and
padded positions both occur. Small enough that the whole file runs in about a minute on one core.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sftfuse.ops import attention, lora_mlp
from sftfuse.patch.families import FAMILIES
from sftfuse.patch.patcher import PatchReport, is_patched, loss_only, patch_model, unpatch_model
from sftfuse.train.models import tiny_model
from tests.patch.common import (
    ATTN,
    EAGER_SKIP,
    VOCAB,
    T,
    count_calls,
    lora_model,
    max_diff,
    peft,
    sft_batch,
    train,
)

# ---------------------------------------------------------------------------------------------------------------
# convergence
# ---------------------------------------------------------------------------------------------------------------

# fp32: the fused path must match HF to fp32 rounding. bf16: held to PyTorch's own bf16 error, measured as the
# distance of unpatched bf16 training from an fp32 run from the same start (`2 * baseline + atol`).
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["fp32", "bf16", "fp32-accum"])
def test_convergence_matches_unpatched(family, mode):
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    accum = mode.endswith("accum")
    batches = [[sft_batch(seed=s), sft_batch((5, 17), pad=0, seed=s + 10)] if accum else [sft_batch(seed=s)]
               for s in range(4)]
    ref_model = lora_model(family, dtype)
    patched = copy.deepcopy(ref_model)
    report = patch_model(patched, strict=True)
    assert report.family == family
    assert [e.reason for e in report.skipped] == [EAGER_SKIP] * 2 * (ATTN[family] == "eager")
    ops = {"linear_cross_entropy", "lora_linear", "lora_mlp", "rms_norm"}
    assert {e.op for e in report.swapped} >= ops | ({"scaled_dot_product_attention (CPU dtype: see the CPU plan)"}
                                                     if ATTN[family] == "sdpa" else set())
    ref_losses, ref_w = train(ref_model, batches)
    losses, w = train(patched, batches)
    if dtype == torch.float32:
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-5)
        assert max_diff(w, ref_w) < 1e-4
        return
    fp32_losses, fp32_w = train(copy.deepcopy(ref_model).float(), batches)
    loss_base = (ref_losses - fp32_losses).abs().max().item()
    w_base = max_diff(ref_w, fp32_w)
    assert (losses - fp32_losses).abs().max().item() <= 2 * loss_base + 1e-2
    assert max_diff(w, fp32_w) <= 2 * w_base + 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_table_matches_transformers(family):
    """Every row's attributes and config keys exist on the installed transformers' model of that family."""
    row, model = FAMILIES[family], tiny_model(family)
    assert isinstance(getattr(model, row.decoder), nn.Module)
    classes = {type(m).__name__ for m in model.modules()}
    assert {row.attn_class, row.mlp_class, row.norm_class} <= classes
    assert getattr(model, row.lm_head) is model.get_output_embeddings()
    if row.softcap_key:
        assert row.softcap(model.config) == getattr(model.config, row.softcap_key) == 30.0
    assert row.logit_scale(model.config) == 1.0


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_single_forward_equals_hf_loss(family):
    """One forward: HF's loss (shift, ignore -100, mean or sum / num_items_in_batch), logits=None while training."""
    model = tiny_model(family).train()
    b = sft_batch()
    ref = model(**b)
    ref_n = model(**b, num_items_in_batch=torch.tensor(7))
    shifted = sft_batch((3, 11), seed=5)["labels"]  # pre-shifted labels (as under context parallelism) win
    ref_shift = model(**b, shift_labels=shifted)
    patch_model(model)
    out = model(**b)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(**b, num_items_in_batch=torch.tensor(7)).loss, ref_n.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(**b, shift_labels=shifted).loss, ref_shift.loss, rtol=1e-6, atol=1e-6)
    assert model(input_ids=b["input_ids"], shift_labels=shifted).loss is None  # HF scores only with `labels`
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**b).loss, ref.loss, rtol=1e-6, atol=1e-6)  # eval: HF's own path
        assert model(**b).logits.shape == (2, T, VOCAB)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_loss_only_takes_the_fused_loss_in_eval(monkeypatch, family):
    """`with loss_only():` an eval-mode call with labels gets the fused loss (logits=None), equal to HF's; outside
    it, and without labels inside it, eval is HF's own path (logits kept); unpatched models ignore it."""
    from sftfuse.ops import cross_entropy as ce_op

    model = lora_model(family)
    b = sft_batch()
    with torch.no_grad():
        ref = model.eval()(**b)
    patch_model(model)
    calls = count_calls(monkeypatch, "linear_cross_entropy", ce_op)
    with torch.no_grad(), loss_only():
        out = model(**b)
        assert len(calls) == 1 and out.logits is None
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
        assert model(input_ids=b["input_ids"]).logits.shape == (2, T, VOCAB)  # no labels: logits, as HF
    with torch.no_grad():
        assert model(**b).logits is not None and len(calls) == 1  # outside it: HF's eval path
    unpatch_model(model)
    with torch.no_grad(), loss_only():
        assert model(**b).logits is not None and len(calls) == 1


# ---------------------------------------------------------------------------------------------------------------
# patch / unpatch / generate / report
# ---------------------------------------------------------------------------------------------------------------


def test_patch_unpatch_patch_is_exact_and_local():
    from transformers import LlamaForCausalLM

    class_forward, ce, sdpa = LlamaForCausalLM.forward, F.cross_entropy, F.scaled_dot_product_attention
    model = lora_model("llama")
    b = sft_batch()
    before = model(**b)
    r1 = patch_model(model)
    r2 = patch_model(model)  # idempotent: same swaps, no stacking
    assert [(e.name, e.op) for e in r1.swapped] == [(e.name, e.op) for e in r2.swapped]
    inner = model.get_base_model()
    assert inner.forward.original.__self__ is inner  # one layer of wrapping, around the class's forward
    first = model(**b).loss
    torch.testing.assert_close(first, before.loss, rtol=1e-5, atol=1e-5)
    assert unpatch_model(model) == len(r1.swapped)
    assert not any(is_patched(m) or "forward" in m.__dict__ for m in model.modules())
    after = model(**b)
    assert torch.equal(after.loss, before.loss) and torch.equal(after.logits, before.logits)
    patch_model(model)
    assert torch.equal(model(**b).loss, first)
    assert LlamaForCausalLM.forward is class_forward and F.cross_entropy is ce  # nothing global was touched
    assert F.scaled_dot_product_attention is sdpa
    other = tiny_model("llama").train()
    assert "forward" not in other.__dict__ and other(**b).logits is not None


@pytest.mark.parametrize("env", [("SFTFUSE_CPU_GEMM", "fp32"), ("SFTFUSE_CPU_ATTENTION", "scores")])
def test_attention_swap_trains_as_unpatched_in_bf16(monkeypatch, env):
    """bf16, the attention swap alone, in fp32 flash (the CPUs where the swap computes in fp32) or as 16-bit scores
    (AMX hosts): losses and adapters within twice unpatched bf16's distance from fp32 training; the op runs in every
    attention call that autograd records and in none under no_grad; eager attention is left alone with its reason."""
    monkeypatch.setenv(*env)
    ref_model = lora_model("llama", torch.bfloat16)
    fp32_model, patched = copy.deepcopy(ref_model).float(), copy.deepcopy(ref_model)
    calls = count_calls(monkeypatch, "scaled_dot_product_attention", attention)
    report = patch_model(patched, cross_entropy=False, lora=False, mlp=False, rms_norm=False, strict=True)
    assert [e.op for e in report.swapped] == ["scaled_dot_product_attention (CPU dtype: see the CPU plan)"] * 2

    def grads(model):  # one backward: AdamW's updates hardly see a gradient's scale, the gradients do
        model(**sft_batch(seed=9)).loss.backward()
        out = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        return out

    ref_g, fp32_g, g = grads(ref_model), grads(fp32_model), grads(patched)
    assert len(calls) == 2
    for n in g:  # each tensor on its own scale: q's adapters get small gradients at this init
        err, base = (g[n] - fp32_g[n]).abs().max(), (ref_g[n] - fp32_g[n]).abs().max()
        assert err <= 2 * base + 1e-3 * fp32_g[n].abs().max(), n
    batches = [[sft_batch(seed=s)] for s in range(4)]
    ref_losses, ref_w = train(ref_model, batches, steps=8)
    fp32_losses, fp32_w = train(fp32_model, batches, steps=8)
    assert len(calls) == 2  # nothing but the patched instance goes through it
    losses, w = train(patched, batches, steps=8)
    assert len(calls) == 2 + 2 * 8  # two layers, eight steps
    assert (losses - fp32_losses).abs().max().item() <= 2 * (ref_losses - fp32_losses).abs().max().item() + 1e-2
    assert max_diff(w, fp32_w) <= 2 * max_diff(ref_w, fp32_w) + 1e-3
    with torch.no_grad():
        patched(**sft_batch())
    assert len(calls) == 2 + 2 * 8
    eager = patch_model(tiny_model("qwen2"))
    assert {e.reason for e in eager.skipped if e.kind == "attention"} == {EAGER_SKIP}


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generate_unchanged(family):
    model = lora_model(family).eval()
    prompt = sft_batch()["input_ids"][:, :6]
    ref = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    patch_model(model)
    assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False), ref)
    model.train()  # a training-mode forward without labels returns the logits too
    with torch.no_grad():
        unpatched = copy.deepcopy(model)
        unpatch_model(unpatched)
        torch.testing.assert_close(model(input_ids=prompt).logits, unpatched(input_ids=prompt).logits)


@pytest.mark.parametrize("mlp", ["recompute", "save", False])
def test_mlp_modes_match_unpatched_and_stay_out_of_no_grad(mlp, monkeypatch):
    """Each MLP mode trains as the unpatched model (fp32); under no_grad the original forward runs. (Dropout masks
    through the recomputed forward: tests/ops/test_fused_blocks.py.)"""
    ref_model = lora_model("qwen3")
    patched = copy.deepcopy(ref_model)
    report = patch_model(patched, mlp=mlp, strict=True)
    assert ("lora_mlp" in {e.op for e in report.swapped}) == bool(mlp)
    batches = [[sft_batch(seed=s)] for s in range(2)]
    calls = []
    real = lora_mlp.lora_mlp
    monkeypatch.setattr(lora_mlp, "lora_mlp", lambda *a, **k: calls.append(k["recompute"]) or real(*a, **k))
    ref_losses, ref_w = train(ref_model, batches, steps=2)
    losses, w = train(patched, batches, steps=2)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-5)
    assert max_diff(w, ref_w) < 1e-4
    assert calls == ([mlp == "recompute"] * 2 * 2 if mlp else [])  # 16-bit bases: "auto" would be "save"
    with torch.no_grad():
        patched(**sft_batch())
    assert len(calls) == (4 if mlp else 0)
    with pytest.raises(ValueError, match="mlp"):
        patch_model(patched, mlp="sometimes")


def test_report_flags_and_skips():
    model = lora_model("llama")
    report = patch_model(model, cross_entropy=False)
    assert isinstance(report, PatchReport)
    assert any(e.reason == "cross_entropy=False" for e in report.skipped)
    assert model(**sft_batch()).logits is not None
    text = str(report)
    assert "lora_linear" in text and "cross_entropy=False" in text and len(text.splitlines()) <= 8
    # a flag switched off on a second call undoes that kind of swap
    patch_model(model, lora=False)
    assert not any(is_patched(m) for m in model.modules() if hasattr(m, "lora_A"))


def test_unsupported_lora_configs_are_left_to_peft():
    dora = lora_model("qwen2", use_dora=True)
    report = patch_model(dora)
    assert report.skipped and all("variant" in e.reason for e in report.skipped)
    b = sft_batch()
    two = lora_model("llama")
    two.add_adapter("second", peft.LoraConfig(r=4, target_modules="all-linear"))
    two.base_model.set_adapter(["default", "second"])
    report = patch_model(two)
    assert all("2 active adapters" in e.reason for e in report.skipped if e.kind == "lora")
    # switched on after patching: handed back to PEFT at call time
    model = lora_model("llama")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    patch_model(model)
    with model.disable_adapter():
        base = model(**b).loss
    ref = copy.deepcopy(model)
    unpatch_model(ref)
    with ref.disable_adapter():
        torch.testing.assert_close(base, ref(**b).loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(**b).loss, ref(**b).loss, rtol=1e-5, atol=1e-5)


def test_unsupported_family_strict_and_generic():
    from transformers import AutoModelForCausalLM, PhiConfig

    cfg = PhiConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=128)
    model = peft.get_peft_model(AutoModelForCausalLM.from_config(cfg).train(),
                                peft.LoraConfig(r=8, target_modules=["q_proj", "fc1"]))
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3, gemma2"):
        patch_model(model, strict=True)
    report = patch_model(model)
    assert report.family == "phi" and any("not supported" in e.reason for e in report.skipped)
    assert any(e.op == "lora_linear" for e in report.swapped)
    assert model(**sft_batch()).logits is not None  # HF's own loss path
