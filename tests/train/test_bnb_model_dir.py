"""`sftfuse train model=DIR` where DIR is a checkpoint transformers saved from a bitsandbytes 4-bit model: it trains
on sftfuse's NF4Linear in a process where bitsandbytes cannot be imported, and its adapter loads on the 16-bit
model (the loader itself: tests/modules/test_bnb_checkpoint.py)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.train.common import ENV, ROOT, _cli, _overrides


def test_train_on_a_bnb_4bit_dir_without_bitsandbytes(tiny_dir, data_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    qdir = tmp_path / "tiny-bnb-4bit"
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=qcfg, device_map="cpu").save_pretrained(qdir)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(qdir)
    fake = tmp_path / "fake" / "bitsandbytes"
    fake.mkdir(parents=True)
    mark = tmp_path / "imported"
    (fake / "__init__.py").write_text(f"open({str(mark)!r}, 'w').close()\nraise ImportError('not installed')\n")
    out = tmp_path / "run"
    args = ["train", *_overrides(qdir, data_dir, out, max_steps=2, eval_interval=0, checkpoint_interval=0,
                                 patch=True)]
    env = {**ENV, "PYTHONPATH": f"{fake.parent}:{ROOT}"}
    proc = subprocess.run(_cli(args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert not mark.exists(), "bitsandbytes was imported"
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(qdir)
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir)
    loaded = PeftModel.from_pretrained(plain, out / "adapter")
    assert sum(".lora_" in n for n, _ in loaded.named_parameters()) == 28  # 2 layers x 7 projections x (A, B)
