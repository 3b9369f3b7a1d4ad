"""Shared by the patcher tests: tiny SFT batches, PEFT-wrapped tiny models, a short AdamW loop, call counters.

Shapes: tiny configs from `sftfuse.train.models.tiny_config` (hidden 64, 2 layers, vocab 1031 = prime, so every
tile is partial), batches of 2 x 24 tokens with different prompt lengths and a right-padded row, so masked and
padded positions both occur.
"""

from __future__ import annotations

import pytest
import torch

from sftfuse.patch.families import FAMILIES
from sftfuse.train.models import tiny_model

peft = pytest.importorskip("peft")

VOCAB, T, STEPS = 1031, 24, 20


def sft_batch(prompt_lens=(8, 13), pad=4, seed=0) -> dict:
    """2 x T tokens; labels -100 on each row's prompt; row 1 right-padded by `pad` (mask 0, label -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(prompt_lens), T), generator=g)
    labels, mask = ids.clone(), torch.ones_like(ids)
    for i, p in enumerate(prompt_lens):
        labels[i, :p] = -100
    if pad:
        labels[-1, -pad:], mask[-1, -pad:] = -100, 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# sdpa where the family allows it, so the attention swap runs too; Gemma-2's attention softcap needs eager
ATTN = {f: "eager" if f == "gemma2" else "sdpa" for f in FAMILIES}
EAGER_SKIP = "attention implementation 'eager': only sdpa's is swapped"


def lora_model(family: str, dtype=torch.float32, **lora_kwargs):
    model = tiny_model(family, dtype=dtype, attn=ATTN[family]).train()
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", **lora_kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return peft.get_peft_model(model, cfg)


def train(model, batches: list[list[dict]], steps=STEPS):
    """AdamW steps; each step accumulates its micro-batches with `num_items_in_batch` when there are several."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for step in range(steps):
        micro = batches[step % len(batches)]
        n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        total = 0.0
        for b in micro:
            extra = {"num_items_in_batch": torch.tensor(n_items)} if len(micro) > 1 else {}
            out = model(**b, **extra)
            out.loss.backward()
            total += out.loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
    adapters = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return torch.tensor(losses, dtype=torch.float64), adapters


def count_calls(monkeypatch, name: str, module) -> list:
    """Count calls of `module.<name>` (proves a test went through the fused path)."""
    calls, fn = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(kwargs.get("num_items_in_batch"))
        return fn(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_trains_alike(monkeypatch, ref, patched, steps: int, module) -> None:
    """`steps` AdamW steps of the unpatched `ref` and of `patched` on the same three SFT batches: the patched one
    goes through `module.lora_linear` (the other never does), with the same losses and adapter weights."""
    calls = count_calls(monkeypatch, "lora_linear", module)
    batches = [[sft_batch(seed=s)] for s in range(3)]
    ref_losses, ref_w = train(ref, batches, steps=steps)
    assert not calls
    losses, w = train(patched, batches, steps=steps)
    assert calls
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-5)
    assert max_diff(w, ref_w) < 1e-4
