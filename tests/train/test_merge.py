"""`sftfuse merge` of adapters trained on a 4-bit base (train/merge.py): the two merges and their fidelity figures.

The adapter here is made in code on the tiny Llama of conftest.py (random A and B, so the delta is not small) and
noted as trained on NF4 in fp32, the case where the faithful merge must be exact up to fp32 rounding: its weights
are bit for bit dequant(NF4(W)) + s * B @ A and its logits match the NF4 model + adapter. The 16-bit merge differs
by the quantization error, which the figures must show.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from sftfuse.train import adapter as ad
from sftfuse.train import merge as mg
from sftfuse.train.cli import main
from tests.train.common import _rows

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _make_adapter(tiny_dir, out, *, qlora: bool, dtype=torch.float32, seed=0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    ad.inject_lora(model, target_modules=TARGETS, r=4, lora_alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in ad.lora_modules(model).values():
            mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.05)
    cfg = ad.peft_config(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, use_rslora=False,
                         base_model=str(tiny_dir))
    return ad.write_adapter(out, ad.adapter_state_dict(model), cfg,
                            training_base=ad.training_base(qlora=qlora, dtype=dtype))


@pytest.fixture(scope="module")
def qlora_adapter(tiny_dir, tmp_path_factory):
    return _make_adapter(tiny_dir, tmp_path_factory.mktemp("qa") / "adapter", qlora=True)


def test_nf4_merge_is_exact_and_16bit_is_not(qlora_adapter, data_dir):
    res = mg.merge(qlora_adapter, merge_into="nf4", validation_file=data_dir / "validation.jsonl")
    assert res.mode == "nf4" and set(res.fidelity) == {"nf4", "16bit"}
    exact, plain = res.fidelity["nf4"], res.fidelity["16bit"]
    assert exact["tokens"] > 0 and exact["rows"] == 8
    assert exact["kl"] < 1e-7 and exact["top1"] == 1.0, exact
    assert plain["kl"] > 1e3 * max(exact["kl"], 1e-9), (plain, exact)

    # the merged weight is dequant(NF4(W)) + s * B @ A, bit for bit
    from sftfuse.modules.linear import NF4Linear

    tensors, config = ad.read_adapter(qlora_adapter)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    w = base.model.layers[1].mlp.down_proj.weight
    key = "base_model.model.model.layers.1.mlp.down_proj"
    want = NF4Linear.from_linear(copy.deepcopy(base.model.layers[1].mlp.down_proj),
                                 compute_dtype=torch.float32).dequantize() + 2.0 * (
        tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"])
    got = res.model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(got, want)
    assert not torch.equal(got, w + 2.0 * (tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]))


def test_auto_picks_nf4_for_a_4bit_trained_adapter_and_16bit_otherwise(qlora_adapter, tiny_dir, tmp_path):
    assert mg.resolve_mode("auto", ad.read_training_base(qlora_adapter)) == mg.DEFAULT_QLORA_MODE
    plain = _make_adapter(tiny_dir, tmp_path / "plain", qlora=False)
    assert mg.resolve_mode("auto", ad.read_training_base(plain)) == "16bit"
    with pytest.raises(ValueError, match="not trained on a 4-bit base"):
        mg.merge(plain, merge_into="nf4")
    res = mg.merge(plain, validation_file=None, fidelity_rows=4)  # bundled validation split
    assert set(res.fidelity) == {"16bit"} and res.fidelity["16bit"]["kl"] < 1e-7  # fp32 base: exact


def test_bf16_training_base_is_rebuilt_as_trained(tiny_dir, tmp_path, data_dir):
    """Trained in bf16: the reference computes in bf16, so neither merge is exact, but nf4 stays far closer."""
    path = _make_adapter(tiny_dir, tmp_path / "a", qlora=True, dtype=torch.bfloat16, seed=1)
    res = mg.merge(path, validation_file=data_dir / "validation.jsonl", fidelity_rows=6)
    assert res.mode == "nf4"
    assert res.fidelity["nf4"]["kl"] < res.fidelity["16bit"]["kl"], res.fidelity
    assert res.model.dtype == torch.float32


def test_cli_merge_prints_both_figures_and_writes_the_model(qlora_adapter, data_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    rc = main(["merge", str(qlora_adapter), str(out), "--fidelity-rows", "3", "--validation",
               str(data_dir / "validation.jsonl")])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "merge fidelity, nf4 (written): mean KL" in text and "merge fidelity, 16bit: mean KL" in text
    assert "top-1 agreement" in text and "(nf4 merge) written to" in text
    assert (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists()


def test_training_base_note_is_checked(tiny_dir, tmp_path):
    path = _make_adapter(tiny_dir, tmp_path / "a", qlora=True)
    (path / ad.TRAINING_BASE).write_text('{"quant": "nf3", "dtype": "float32"}')
    with pytest.raises(ValueError, match="training_base.json"):
        ad.read_training_base(path)
    (path / ad.TRAINING_BASE).unlink()
    assert ad.read_training_base(path) is None
    assert mg.resolve_mode("auto", None) == "16bit"
    res = mg.merge(path, merge_into="nf4", fidelity_rows=2)  # no note: sftfuse's NF4 defaults, bf16 compute
    assert res.mode == "nf4" and res.training_base["dtype"] == "bfloat16"


def test_fidelity_examples_cap_rows(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert len(mg.fidelity_examples(tok, rows=5)) == 5
    assert len(_rows("validation", 5)) == 5


def test_nf4_merge_reproduces_the_model_as_trained(tiny_dir, data_dir, tmp_path):
    """A real QLoRA run (fp32 compute, so rounding stays out of the way): the trainer writes training_base.json, and
    the nf4 merge rebuilt from it gives the trained model's logits (the NF4 base + LoRA layers the optimizer
    updated), while the 16bit merge does not."""
    from sftfuse.train.config import load_config
    from sftfuse.train.trainer import Trainer
    from tests.train.common import _overrides

    out = tmp_path / "run"
    cfg = load_config(None, _overrides(tiny_dir, data_dir, out, qlora=True, dtype="fp32", max_steps=3, lr=3e-2,
                                       eval_interval=0, checkpoint_interval=0, grad_accum=1))
    t = Trainer(cfg, quiet=True)
    try:
        t.setup()
        t.train()
        trained = copy.deepcopy(t.model).eval()
        t.finish()
    finally:
        t.cleanup()
    assert json.loads((out / "adapter" / ad.TRAINING_BASE).read_text()) == {
        "quant": "nf4", "blocksize": 64, "double_quant": True, "dtype": "float32"}
    ids = torch.tensor([[5, 17, 250, 3, 99, 41, 7]])
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        nf4 = mg.merge(out / "adapter", merge_into="nf4", fidelity_rows=0).model(input_ids=ids).logits
        w16 = mg.merge(out / "adapter", merge_into="16bit", fidelity_rows=0).model(input_ids=ids).logits
    err_nf4, err_16 = (nf4 - want).abs().max().item(), (w16 - want).abs().max().item()
    assert err_nf4 < 1e-4 and err_16 > 100 * err_nf4, (err_nf4, err_16)
