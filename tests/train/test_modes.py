"""Training modes (`mode=full|lora|qlora|dora`), `freeze`, and the optimizers (`optimizer=`) on the tiny Llama.

Each mode: patched vs unpatched losses per step (fp32, so the only difference is the fused ops' rounding), a
resume from the step-2 checkpoint that redoes steps 3-4 with the same losses, and the saved output loaded by
transformers / PEFT with the logits of the model the run evaluated.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from sftfuse.train import modes as md
from sftfuse.train.config import TrainConfig, load_config
from sftfuse.train.trainer import Trainer, train
from tests.train.common import _overrides


def _cfg(tiny_dir, data_dir, out, **kw):
    """The tiny run of tests/train/common.py, without its `qlora=false` (here `mode` decides)."""
    return load_config(None, [a for a in _overrides(tiny_dir, data_dir, out, **kw) if not a.startswith("qlora=")])


def _run(cfg, **kw):
    """(the Trainer after finish(), its TrainResult); the tuned model stays in t.model."""
    t = Trainer(cfg, quiet=True, **kw)
    try:
        t.setup()
        t.train()
        res = t.finish()
    finally:
        t.cleanup()
    return t, res


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ------------------------------------------------------------------------------------------------------ config
def test_mode_is_the_one_switch_and_the_old_qlora_key_maps_onto_it():
    # LoRA on the 16-bit base by default: the NF4 rounding alone cost the default model +27% probe NLL (issue 18)
    assert (load_config().mode, load_config().qlora, load_config().lr) == ("lora", False, 1e-3)
    assert load_config(None, ["qlora=false"]).mode == "lora"
    assert load_config(None, ["qlora=true"]).mode == "qlora"
    full = load_config(None, ["mode=full"])
    assert (full.qlora, full.lr) == (False, md.DEFAULT_LR["full"]) and full.lr <= 5e-5
    assert load_config(None, ["mode=full", "lr=1e-4"]).lr == 1e-4
    assert load_config(None, ["mode=dora", "qlora=false"]).mode == "dora"
    with pytest.raises(ValueError, match=r"qlora=true conflicts with mode=lora.*give mode alone"):
        load_config(None, ["mode=lora", "qlora=true"])
    with pytest.raises(ValueError, match=r"qlora=false conflicts with mode=qlora"):
        load_config(None, ["mode=qlora", "qlora=false"])
    with pytest.raises(ValueError, match=r"mode='fulll': expected one of full, lora, qlora, dora"):
        load_config(None, ["mode=fulll"])
    with pytest.raises(ValueError, match=r"freeze=\['model.embed_tokens'\]: freezing weights applies to mode=full"):
        load_config(None, ["freeze=[model.embed_tokens]"])
    with pytest.raises(ValueError, match=r"optimizer='adam8bit': expected one of adamw, adamw8bit"):
        load_config(None, ["optimizer=adam8bit"])
    assert TrainConfig(mode="full").validate().lr == md.DEFAULT_LR["full"]


def test_checkpoint_of_another_mode_or_optimizer_is_refused():
    from sftfuse.train.checkpoint import FIXED

    assert {"mode", "freeze", "optimizer"} <= set(FIXED)


# ---------------------------------------------------------------------------------------- patched vs unpatched
@pytest.mark.parametrize("mode", ["full", "lora", "qlora", "dora"])
def test_patched_losses_track_unpatched_in_every_mode(tiny_dir, data_dir, tmp_path, mode):
    """The fused ops (loss with a trained head in full mode, RMSNorm and attention with trained weights, LoRA and
    NF4 linears, PEFT's DoRA left in place) change only rounding: fp32 losses agree at every step."""
    lr = 1e-3 if mode == "full" else 3e-3
    runs = {}
    for patch in (False, True):
        cfg = _cfg(tiny_dir, data_dir, tmp_path / f"{mode}{patch}", mode=mode, patch=patch, lr=lr,
                   checkpoint_interval=0)
        runs[patch] = train(cfg, quiet=True).losses
    assert len(runs[True]) == 4
    assert runs[True][-1] < runs[True][0]
    for a, b in zip(runs[True], runs[False], strict=True):
        assert abs(a - b) <= 1e-4 * abs(b), (runs[True], runs[False])


# ------------------------------------------------------------------------------------- resume and saved outputs
def test_full_mode_resumes_and_saves_a_model_transformers_loads(tiny_dir, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "full"
    cfg = _cfg(tiny_dir, data_dir, out, mode="full", patch=True, lr=1e-3, keep_checkpoints=0)
    t, res = _run(cfg)
    assert res.adapter_dir == out / "model" and not (out / "adapter").exists()
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (out / "model").iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask, modes  # safetensors writes 0600: others could not read it
    assert t.parity is not None and t.parity.n_grads > 0  # the trained head's and norms' gradients were checked
    loaded = AutoModelForCausalLM.from_pretrained(out / "model")
    ids = torch.randint(0, loaded.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(loaded, ids), _logits(t.model, ids), rtol=0, atol=0)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert not torch.allclose(_logits(base, ids), _logits(loaded, ids))  # it trained
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.chat_template and "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    results = json.loads((out / "results.json").read_text())["run"]
    assert results["mode"] == "full" and results["optimizer_state_bytes"] == 8 * results["trainable_params"] + 4 * len(
        t.params)  # two fp32 moments per weight, an fp32 step per tensor
    assert results["saved_bytes"] > 4 * results["trainable_params"] / 2  # every weight, on disk

    resumed = train(cfg, resume=True, quiet=True)  # from step-2: redoes steps 3 and 4
    assert resumed.losses == res.losses[2:]


def test_dora_resumes_and_saves_what_peft_loads(tiny_dir, data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dora"
    cfg = _cfg(tiny_dir, data_dir, out, mode="dora", patch=True, lr=1e-2, keep_checkpoints=0)
    t, res = _run(cfg)
    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert conf["use_dora"] is True and conf["peft_type"] == "LORA"
    assert "Dora" in " ".join(e.reason for e in t.patched.skipped)  # left to PEFT, and reported
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ids = torch.randint(0, base.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    before = _logits(base, ids)
    peft = PeftModel.from_pretrained(base, out / "adapter")
    with torch.no_grad():
        mags = [m for n, m in peft.named_parameters() if "lora_magnitude_vector" in n]
    assert mags  # the magnitudes came back from the file
    torch.testing.assert_close(_logits(peft, ids), _logits(t.model, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, _logits(peft, ids))

    resumed = train(cfg, resume=True, quiet=True)
    assert resumed.losses == res.losses[2:]


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_adapter_modes_resume(tiny_dir, data_dir, tmp_path, mode):
    cfg = _cfg(tiny_dir, data_dir, tmp_path / mode, mode=mode, patch=True, keep_checkpoints=0)
    res = train(cfg, quiet=True)
    assert train(cfg, resume=True, quiet=True).losses == res.losses[2:]


# ------------------------------------------------------------------------------------------------------ freeze
def test_freeze_keeps_the_matched_weights_and_refuses_a_pattern_that_matches_nothing(tiny_dir, data_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "frozen"
    cfg = _cfg(tiny_dir, data_dir, out, mode="full", freeze="[model.embed_tokens, '*.layers.0.*']", lr=1e-3,
               checkpoint_interval=0)
    t, _ = _run(cfg)
    names = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert names and not any("embed_tokens" in n or ".layers.0." in n for n in names)
    saved = load_file(str(out / "model" / "model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    assert torch.equal(saved["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(saved["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(saved["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(ValueError, match=r"freeze: pattern 'model.embeddings' matches no parameter"):
        train(_cfg(tiny_dir, data_dir, tmp_path / "typo", mode="full", freeze="[model.embeddings]"), quiet=True)


# ------------------------------------------------------------------------------------------------------ merge
def test_merge_of_a_full_run_says_there_is_nothing_to_merge_and_dora_merges_exactly(tiny_dir, data_dir, tmp_path,
                                                                                    capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sftfuse.train.adapter import merge_tensors_into_, read_adapter
    from sftfuse.train.cli import main

    full = tmp_path / "full"
    train(_cfg(tiny_dir, data_dir, full, mode="full", max_steps=1, eval_interval=0, checkpoint_interval=0),
          quiet=True)
    for src in (full, full / "model"):
        assert main(["merge", str(src), str(tmp_path / "merged")]) == 1
        assert "nothing to merge" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()

    dora = tmp_path / "dora"
    train(_cfg(tiny_dir, data_dir, dora, mode="dora", lr=1e-2, max_steps=2, eval_interval=0, checkpoint_interval=0),
          quiet=True)
    tensors, conf = read_adapter(dora / "adapter")
    with pytest.raises(ValueError, match="DoRA"):  # the plain LoRA merge would drop the magnitudes silently
        merge_tensors_into_(AutoModelForCausalLM.from_pretrained(tiny_dir), tensors, conf)
    assert main(["merge", str(dora / "adapter"), str(tmp_path / "dmerged"), "--base-model", str(tiny_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "dmerged")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), dora / "adapter")
    ids = torch.randint(0, merged.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(_logits(merged, ids), _logits(peft, ids), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------------- optimizers
def test_adamw8bit_runs_on_cpu_with_smaller_states_and_resumes(tiny_dir, data_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "a8"
    cfg = _cfg(tiny_dir, data_dir, out, mode="full", optimizer="adamw8bit", lr=1e-3, keep_checkpoints=0)
    t, res = _run(cfg)
    assert t.opt_runs == "adamw8bit"
    n = sum(p.numel() for p in t.params)
    run = json.loads((out / "results.json").read_text())["run"]
    assert 0 < run["optimizer_state_bytes"] < 8 * n / 2  # 8-bit moments (small tensors keep fp32 ones)
    assert res.losses[-1] < res.losses[0]
    assert train(cfg, resume=True, quiet=True).losses == res.losses[2:]


def test_paged_optimizer_on_cpu_says_what_runs_instead():
    pytest.importorskip("bitsandbytes")
    from sftfuse.train.optim import build_optimizer

    p = torch.nn.Parameter(torch.randn(64, 128))
    opt, runs, why = build_optimizer("paged_adamw8bit", [p], lr=1e-3, weight_decay=0.0, device=torch.device("cpu"))
    assert runs == "adamw8bit" and "need CUDA" in why and "running adamw8bit" in why
    _, runs, why = build_optimizer("adamw", [p], lr=1e-3, weight_decay=0.0, device=torch.device("cpu"))
    assert (runs, why) == ("adamw", None)


def test_fp32_parameters_are_their_own_masters():
    from sftfuse.train.optim import grads_to_masters, make_masters, masters_to_params

    p32, p16 = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5).bfloat16())
    masters = make_masters([p32, p16])
    assert masters[0] is p32 and masters[1].dtype == torch.float32 and masters[1] is not p16
    p32.grad, p16.grad = torch.ones(5), torch.full((5,), 2.0, dtype=torch.bfloat16)
    grads_to_masters(masters, [p32, p16])
    assert torch.equal(p32.grad, torch.ones(5)) and torch.equal(masters[1].grad, torch.full((5,), 2.0))
    assert p16.grad is None
    with torch.no_grad():
        masters[1].add_(1.0)
    masters_to_params(masters, [p32, p16])
    assert torch.equal(p16.float(), masters[1].detach().bfloat16().float())


@pytest.mark.parametrize("mode", ["full", "dora"])
def test_bf16_runs_pass_the_patch_parity_check(tiny_dir, data_dir, tmp_path, mode):
    """The default recipe's dtype: bf16 compute with fp32 masters; the parity guard checks the mode's trained
    tensors (a full fine-tune's head, norms and first/last layers; DoRA's A, B and magnitudes) and passes."""
    cfg = _cfg(tiny_dir, data_dir, tmp_path / mode, mode=mode, patch=True, dtype="bf16", lr=1e-3, max_steps=2,
               eval_interval=0, checkpoint_interval=0)
    t, res = _run(cfg)
    assert t.parity is not None and t.parity.ratio <= 1.0 and t.parity.n_grads > 0
    assert {m.dtype for m in t.masters} == {torch.float32}
    # full: the model's weights are bf16 and the masters copies; PEFT keeps DoRA's tensors in fp32 (their own masters)
    assert {p.dtype for p in t.params} == {torch.bfloat16 if mode == "full" else torch.float32}
    assert all(map(torch.isfinite, torch.tensor(res.losses)))


def test_the_closing_line_names_a_full_runs_model_and_an_adapter_runs_adapter():
    from sftfuse.train.report import summary_text

    run = {"steps": 1, "train_seconds": 1.0, "tokens_per_s": 1.0, "wall_seconds": 1.0, "peak_memory": "1 GiB"}
    full = summary_text(run, None, None, None, "OUT/model", "R", {"mode": "full"})
    lora = summary_text(run, None, None, None, "OUT/adapter", "R", {"mode": "lora"})
    assert full.endswith("\nmodel: OUT/model  report: R") and lora.endswith("\nadapter: OUT/adapter  report: R")
