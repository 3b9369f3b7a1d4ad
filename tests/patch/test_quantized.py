"""patch_model over 4-bit bases: bitsandbytes NF4 Linear4bit (PEFT QLoRA) and sftfuse's own NF4Linear / LoRALinear,
and swap matching by class."""

from __future__ import annotations

import copy

import pytest
import torch

from sftfuse.ops import lora, nf4
from sftfuse.patch.patcher import patch_model
from sftfuse.train.models import tiny_model
from tests.patch.common import (
    assert_trains_alike,
    count_calls,
    peft,
    sft_batch,
)

# ---------------------------------------------------------------------------------------------------------------
# 4-bit bases: bitsandbytes NF4 Linear4bit (PEFT QLoRA) and sftfuse's own NF4Linear / LoRALinear
# ---------------------------------------------------------------------------------------------------------------


def bnb_lora_model(family: str, tmp_path):
    """A tiny model loaded through transformers' bitsandbytes NF4 path (double quant, fp32 compute) + PEFT LoRA."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model(family).save_pretrained(tmp_path)
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=qcfg, device_map="cpu").train()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


# fp32 compute on both sides: the same NF4 codes dequantized to fp32, so only summation order differs.
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_bnb_qlora_matches_unpatched(family, tmp_path, monkeypatch):
    ref_model = bnb_lora_model(family, tmp_path)
    patched = copy.deepcopy(ref_model)
    report = patch_model(patched, strict=True)
    ops = {(e.module_type, e.op) for e in report.swapped}
    assert ("lora.Linear4bit", "lora_linear") in ops and ("bnb.Linear4bit", "nf4_matmul") in ops
    assert_trains_alike(monkeypatch, ref_model, patched, 6, lora)


def test_bnb_linear4bit_alone_uses_nf4_matmul(tmp_path, monkeypatch):
    model = bnb_lora_model("qwen2", tmp_path).get_base_model()
    layer = model.model.layers[0].mlp.down_proj.get_base_layer()
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    ref = layer(x)
    (ref_dx,) = torch.autograd.grad(ref, x, torch.ones_like(ref))
    patch_model(layer)
    calls = count_calls(monkeypatch, "nf4_matmul", nf4)
    out = layer(x)
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert len(calls) == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)


def test_sftfuse_qlora_modules_are_native_and_loss_is_fused():
    from sftfuse.modules.linear import LoRALinear, NF4Linear
    from sftfuse.modules.quantize import quantize_model

    model = quantize_model(tiny_model("llama"), compute_dtype=torch.float32).train().requires_grad_(False)
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, LoRALinear.from_linear(module, r=8))
    b = sft_batch()
    ref = model(**b).loss
    report = patch_model(model, strict=True)
    assert {e.op for e in report.swapped} == {"linear_cross_entropy", "linear_cross_entropy (head weight via the "
                                                                      "module call)", "lora_linear (native)",
                                              "nf4_matmul (native)", "lora_mlp", "rms_norm"}
    out = model(**b)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)


def test_swaps_match_by_class_not_by_name():
    """The swaps match sftfuse's and the families' modules with isinstance: a subclass defined anywhere (here, in
    this test module) is matched, and a look-alike class of the same name that is not one is left alone."""
    from sftfuse.modules.linear import LoRALinear, NF4Linear
    from sftfuse.patch.swaps import SWAPS

    class MyNF4(NF4Linear):
        pass

    class MyLoRA(LoRALinear):
        pass

    class LlamaMLP(torch.nn.Module):  # the name of a family class, but not the class
        pass

    class NF4Linear(torch.nn.Module):  # noqa: F811  (shadows the import on purpose: same name, other class)
        pass

    base = MyNF4.from_linear(torch.nn.Linear(64, 32), compute_dtype=torch.float32)
    kinds = {type(m).__name__: [s.op for s in SWAPS if s.match(m)] for m in (base, MyLoRA.from_linear(base, r=4),
                                                                          LlamaMLP(), NF4Linear())}
    assert kinds == {"MyNF4": ["nf4_matmul (native)"], "MyLoRA": ["lora_linear (native)"], "LlamaMLP": [],
                     "NF4Linear": []}
    mlp = tiny_model("llama").model.layers[0].mlp
    assert [s.kind for s in SWAPS if s.match(mlp)] == ["mlp"]
