"""TRL SFTTrainer, the way many users train: plain, `patch_model(trainer.model)`, and with `trl_head=True`.

SmolLM2-135M-Instruct in bf16, PEFT LoRA r=16 (alpha 32, dropout 0.05) on all linears through SFTTrainer's
`peft_config`, the bundled chat data (sftfuse/data/train.jsonl, its "messages"), 8 conversations per batch, loss
on every token (TRL's default for conversations). One trainer; each round runs `trainer.training_step` (forward,
TRL's loss, backward) on the same batch in the three modes, the order rotating, weights fixed (no optimizer step),
so the modes meet the same load and the same inputs:
  plain       TRL's own fused head computes the loss (`add_fused_lm_head`; on CPU it projects every position)
  patched     `patch_model(trainer.model)`: LoRA, MLP, RMSNorm and attention swapped; TRL's head still computes the
              loss (the patch report says so)
  trl_head    `patch_model(trainer.model, trl_head=True)`: sftfuse's linear_cross_entropy answers TRL's head calls
Losses: with dropout off, the three modes' losses on the first batch (same weights) are reported side by side.
Run: `python -m pytest bench/test_trl.py`; table in bench/results/trl.md.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pytest
import torch

ROUNDS, BATCH, MAX_LEN = 5, 8, 256
MODES = ("plain", "patched", "trl_head")


def _trainer(tmp_path, dropout: float):
    trl = pytest.importorskip("trl")
    import peft
    from datasets import Dataset

    from sftfuse.train.models import load_default_model

    model, tok = load_default_model(dtype=torch.bfloat16)
    lines = (Path(__file__).resolve().parents[1] / "sftfuse" / "data" / "train.jsonl").read_text().splitlines()
    rows = [{"messages": json.loads(line)["messages"]} for line in lines[: BATCH * 4]]
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_length=MAX_LEN, bf16=True,
                         use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0)
    cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear",
                          task_type="CAUSAL_LM")
    return trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), peft_config=cfg,
                          processing_class=tok)


def _set_mode(trainer, mode: str):
    from sftfuse.patch.patcher import patch_model, unpatch_model

    unpatch_model(trainer.model)
    return None if mode == "plain" else patch_model(trainer.model, trl_head=mode == "trl_head")


def _batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    return batch, n_items


def test_trl_sft_trainer(tmp_path, bench_record):
    from conftest import x_floor

    trainer = _trainer(tmp_path, 0.0)  # losses: dropout off, the same weights and batch in every mode
    batch, n_items = _batch(trainer)
    losses = {}
    for mode in MODES:
        _set_mode(trainer, mode)
        losses[mode] = float(trainer.training_step(trainer.model, dict(batch), n_items))
        trainer.model.zero_grad(set_to_none=True)
    _set_mode(trainer, "plain")
    del trainer

    trainer = _trainer(tmp_path, 0.05)
    batch, n_items = _batch(trainer)
    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    times: dict[str, list[float]] = {m: [] for m in MODES}
    report = None
    for i in range(ROUNDS + 1):
        for mode in MODES[i % 3:] + MODES[: i % 3]:
            rep = _set_mode(trainer, mode)
            report = rep if mode == "trl_head" and rep is not None else report
            t0 = time.perf_counter()
            trainer.training_step(trainer.model, dict(batch), n_items)
            if i:  # round 0 warms up
                times[mode].append(time.perf_counter() - t0)
            trainer.model.zero_grad(set_to_none=True)
    print(report)
    # FLOPs of the plain step (forward + input gradients of 106.2 M linear weights per token, and TRL's head on
    # every position with its weight frozen); attention left out: a lower bound, so "x floor" is an upper one
    seq = batch["input_ids"].shape[1]
    flops = 4 * 106.2e6 * batch["input_ids"].numel() + 4 * batch["input_ids"].shape[0] * (seq - 1) * 576 * 49152
    for mode in MODES:
        med = statistics.median(times[mode])
        speed = statistics.median(p / t for p, t in zip(times["plain"], times[mode], strict=True))
        bench_record("trl", {"mode": mode, "batch": f"{BATCH} x {seq}", "tokens": tokens, "s/step (fwd+bwd)": med,
                             "speed vs plain": speed, "x floor": x_floor(med, flops),
                             "loss, dropout 0": losses[mode], "loss - plain's": losses[mode] - losses["plain"]})
    assert abs(losses["patched"] - losses["plain"]) < 2e-2 * abs(losses["plain"])
    assert abs(losses["trl_head"] - losses["plain"]) < 2e-2 * abs(losses["plain"])
