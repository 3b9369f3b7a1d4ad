"""PEFT QLoRA on sftfuse's own 4-bit model: `peft.get_peft_model(quantize_model(model), LoraConfig(...))`, then
`patch_model`, training, `save_pretrained`, and `PeftModel.from_pretrained` on the plain 16-bit model.

NF4 weights are dequantized to fp32 here (compute_dtype fp32), so patched and unpatched runs differ only in
summation order and compare at 1e-5; one test runs the bf16 compute dtype the default recipe uses.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from sftfuse.modules.linear import NF4Linear
from sftfuse.modules.quantize import quantize_model
from sftfuse.ops import lora
from sftfuse.patch.patcher import patch_model
from sftfuse.train.models import tiny_model
from tests.patch.common import ATTN, assert_trains_alike, max_diff, peft, sft_batch, train

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def nf4_peft(family="llama", *, compute=torch.float32, targets=TARGETS, **lora_kwargs):
    """A tiny model quantized by sftfuse, wrapped by PEFT with a plain LoraConfig (r=8, alpha=16)."""
    model = quantize_model(tiny_model(family, attn=ATTN[family]).train(), compute_dtype=compute)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, bias="none",
                          **{"lora_dropout": 0.0, **lora_kwargs})
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return peft.get_peft_model(model, cfg)


def _peft_linears(model):
    from peft.tuners.lora import Linear

    return {n: m for n, m in model.named_modules() if isinstance(m, Linear)}


def _grads(model, batch):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = model(**batch).loss
    return loss, dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


@pytest.mark.parametrize("family,use_rslora", [("llama", False), ("gemma2", True)])
def test_peft_qlora_flow_end_to_end(family, use_rslora, tmp_path, monkeypatch):
    """quantize -> get_peft_model -> patch_model: the same loss and gradients at every step as unpatched PEFT; the
    saved adapter loads on the plain model and, over the dequantized weights, gives the trained model's logits."""
    ref = nf4_peft(family, use_rslora=use_rslora)
    layers = _peft_linears(ref)
    assert len(layers) == 14 and all(isinstance(m.get_base_layer(), NF4Linear) for m in layers.values())
    assert {m.scaling["default"] for m in layers.values()} == {16 / (math.sqrt(8) if use_rslora else 8)}
    patched = copy.deepcopy(ref)
    report = patch_model(patched, strict=True)
    ops = {(e.module_type, e.op) for e in report.swapped}
    assert ("lora.Linear", "lora_linear") in ops and ("NF4Linear", "nf4_matmul (native)") in ops, ops
    assert any(op == "lora_mlp" for _, op in ops) and any(op.startswith("linear_cross_entropy") for _, op in ops)
    b = sft_batch(seed=7)
    ref_loss, ref_g = _grads(ref, b)
    loss, g = _grads(patched, b)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert g.keys() == ref_g.keys() and len(g) == 28
    for k in g:
        torch.testing.assert_close(g[k], ref_g[k], rtol=1e-4, atol=1e-6, msg=k)
    assert_trains_alike(monkeypatch, ref, patched, 5, lora)
    _check_adapter_on_plain_model(patched, family, tmp_path, use_rslora)


def _check_adapter_on_plain_model(trained, family, tmp_path, use_rslora):
    from peft import PeftModel
    from safetensors.torch import load_file

    trained.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == set(TARGETS) and cfg["use_rslora"] == use_rslora and cfg["bias"] == "none"
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    plain_peft = peft.get_peft_model(tiny_model(family), peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    expected = {k.replace(".default", "") for k in plain_peft.state_dict() if ".lora_" in k}
    assert set(saved) == expected  # the names a 16-bit PEFT model of the same config saves and loads
    # over dequant(NF4(W)) the adapter must reproduce the trained model; over W, only NF4's error separates them
    twin = tiny_model(family)
    nf4 = {n.removeprefix("base_model.model."): m for n, m in trained.named_modules() if isinstance(m, NF4Linear)}
    with torch.no_grad():
        for name, m in nf4.items():
            twin.get_submodule(name.removesuffix(".base_layer")).weight.copy_(m.dequantize())
    loaded = PeftModel.from_pretrained(twin, tmp_path / "adapter").eval()
    trained_params = dict(trained.named_parameters())
    for n, p in loaded.named_parameters():
        if ".lora_" in n:
            assert torch.equal(p, trained_params[n]), n
    ids = torch.randint(0, 1000, (2, 17))
    with torch.no_grad():
        want = trained.eval()(ids).logits
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-5, atol=1e-5)
        on_plain = PeftModel.from_pretrained(tiny_model(family), tmp_path / "adapter").eval()
        with loaded.disable_adapter(), on_plain.disable_adapter():
            base_nf4, base_plain = loaded(ids).logits, on_plain(ids).logits
        assert (base_nf4 - want).abs().max() > 1e-3  # the trained adapter does change the logits
        # on the 16-bit weights the adapter moves the logits about as it does on the NF4 ones: what separates the
        # two is NF4's own error on the base
        assert (on_plain(ids).logits - want).norm() < 1.5 * (base_plain - base_nf4).norm()


def test_all_linear_targets_every_nf4_projection():
    """PEFT's "all-linear" shorthand finds NF4Linear (an nn.Linear subclass) and leaves out the output head."""
    model = nf4_peft("llama", targets="all-linear")
    assert {n.removeprefix("base_model.model.") for n in _peft_linears(model)} == {
        n.removeprefix("base_model.model.") for n in _peft_linears(nf4_peft("llama"))}
    assert len(_peft_linears(model)) == 14 and type(model.base_model.model.lm_head) is torch.nn.Linear


def test_target_subset_leaves_the_rest_nf4(monkeypatch):
    """Only q_proj and v_proj get adapters; the MLP stays NF4Linear, so the MLP swap says why it stands aside."""
    ref = nf4_peft("qwen2", targets=["q_proj", "v_proj"])
    layers = _peft_linears(ref)
    assert {n.rsplit(".", 1)[1] for n in layers} == {"q_proj", "v_proj"} and len(layers) == 4
    assert isinstance(ref.base_model.model.model.layers[0].mlp.up_proj, NF4Linear)
    patched = copy.deepcopy(ref)
    report = patch_model(patched, strict=True)
    assert sum(e.op == "lora_linear" for e in report.swapped) == 4
    assert any("gate_proj is a NF4Linear, not a LoRA linear" in e.reason for e in report.skipped)
    batches = [[sft_batch(seed=s)] for s in range(2)]
    ref_losses, ref_w = train(ref, batches, steps=3)
    losses, w = train(patched, batches, steps=3)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-5)
    assert max_diff(w, ref_w) < 1e-4


def test_dropout_reaches_the_fused_path(monkeypatch):
    """lora_dropout=0.1: the patched forward passes p to lora_linear in training (masks differ from PEFT's, so
    training losses agree only loosely) and none in eval, where logits equal PEFT's."""
    ref = nf4_peft("llama", lora_dropout=0.1)
    with torch.no_grad():  # B = 0 at init would hide the mask
        for m in _peft_linears(ref).values():
            m.lora_B["default"].weight.normal_(std=0.5)
    patched = copy.deepcopy(ref)
    patch_model(patched, strict=True)
    seen = []
    fn = lora.lora_linear
    monkeypatch.setattr(lora, "lora_linear", lambda *a, **k: seen.append((k["dropout"], k["training"])) or fn(*a, **k))
    b = sft_batch(seed=3)
    first, second = patched(**b).loss.item(), patched(**b).loss.item()  # with autograd: the fused MLP runs too
    assert first != second  # a fresh mask per call
    assert {p for p, _ in seen} == {0.1} and all(t for _, t in seen)
    ref_loss = ref(**b).loss.item()
    assert abs(first - ref_loss) < 0.05 * ref_loss
    with torch.no_grad():
        ids = b["input_ids"]
        torch.testing.assert_close(patched.eval()(ids).logits, ref.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    assert not seen[-1][1]


def test_bf16_compute_tracks_peft():
    """The default recipe's dtype: NF4 decoded to bf16. PEFT runs the adapter in fp32, the fused path in bf16,
    so the losses agree closely, not exactly (measured: 1.5e-5 relative over these steps)."""
    ref = nf4_peft("llama", compute=torch.bfloat16)
    patched = copy.deepcopy(ref)
    patch_model(patched, strict=True)
    batches = [[sft_batch(seed=s)] for s in range(2)]
    ref_losses, _ = train(ref, batches, steps=4)
    losses, _ = train(patched, batches, steps=4)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-3, atol=0)
    assert losses[-1] < losses[0]


def test_what_needs_16_bit_weights_is_refused_not_miscomputed():
    """DoRA, PiSSA and OLoRA read the base weight as floats, and merging writes into it: on NF4Linear's packed
    bytes PEFT raises (its own message) rather than compute on them, and the packed weight is left untouched."""
    for kwargs, error in ((dict(use_dora=True), RuntimeError), (dict(init_lora_weights="pissa"), TypeError),
                          (dict(init_lora_weights="olora"), TypeError)):
        with pytest.raises(error):
            nf4_peft("llama", **kwargs)
    model = nf4_peft("llama")
    with torch.no_grad():
        for m in _peft_linears(model).values():
            m.lora_B["default"].weight.normal_()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    before = q.get_base_layer().weight.clone()
    with pytest.raises(RuntimeError):
        model.merge_and_unload()
    assert torch.equal(q.get_base_layer().weight, before) and not q.merged
