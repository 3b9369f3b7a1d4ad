"""TRL SFTTrainer: its own fused LM head bypasses sftfuse's loss unless patch_model(..., trl_head=True).

TRL 1.16 installs a fused head on the model and computes the SFT loss from its per-token log-probs; patched after
the trainer is built, `trl_head=True` answers those calls with `linear_cross_entropy` (the masked rows never
projected). The losses must be those of the plain trainer, step by step.
"""

from __future__ import annotations

import math

import pytest
import torch

from sftfuse.ops import cross_entropy
from sftfuse.patch.patcher import patch_model
from tests.patch.common import VOCAB, count_calls, lora_model
from tests.patch.test_integrations import word_tokenizer


def _dataset():
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)

    def words(n):
        return " ".join(f"w{i}" for i in torch.randint(0, VOCAB - 3, (n,), generator=g).tolist())

    return Dataset.from_list([{"prompt": words(6 + i % 5), "completion": words(8 + i % 3)} for i in range(12)])


@pytest.mark.parametrize("trl_head", [False, True])
def test_trl_head_setting_reaches_the_fused_loss_with_the_same_losses(tmp_path, monkeypatch, trl_head):
    trl = pytest.importorskip("trl")
    ds = _dataset()
    calls = count_calls(monkeypatch, "linear_cross_entropy", cross_entropy)
    losses, metrics, reports = [], [], []
    for patched in (False, True):
        args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=3, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", seed=0, max_length=32, bf16=False)
        trainer = trl.SFTTrainer(model=lora_model("qwen3"), args=args, train_dataset=ds,
                                 processing_class=word_tokenizer())
        if patched:
            reports.append(patch_model(trainer.model, trl_head=trl_head))
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
        metrics.append([h.get("mean_token_accuracy") for h in trainer.state.log_history if "loss" in h])
    assert len(losses[0]) == 3
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-5)
    note = "\n".join(reports[0].notes)
    if trl_head:
        assert len(calls) == 3 * 2  # every micro-batch's loss came from linear_cross_entropy
        assert "trl_head=True" in note and all(math.isnan(m) for m in metrics[1])
    else:
        assert not calls  # TRL's own head computed every loss: the report says so and names the setting
        assert "bypassed" in note and "trl_head=True" in note
