"""What a run gained and what it lost: task accuracy and the forgetting probe (the report: `sftfuse.train.report`).

- Task evaluation: greedy, batched generation (left padding, stop at EOS, `max_new_tokens` short because the
  bundled answers are short) on the test split's prompts, scored per family by `sftfuse.train.tasks.score`.
- Forgetting probe: before training the base model answers a fixed set of general prompts (outside the training
  tasks). The mean per-token NLL of those answers under the base model and under the tuned model, and the
  relative change, say how far the model drifted from its own behaviour. `replay_ratio` mixes these answers
  back into training.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

# -- prompts -----------------------------------------------------------------------------------------------------


def prompt_messages(row: dict) -> list[dict]:
    """The conversation up to (not including) the answer to be generated."""
    if "messages" in row:
        msgs = list(row["messages"])
        while msgs and msgs[-1].get("role") == "assistant":
            msgs.pop()
        return msgs
    if "prompt" in row:
        return [{"role": "user", "content": row["prompt"]}]
    if "instruction" in row:
        text = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return [{"role": "user", "content": text}]
    raise ValueError(f"row has no messages/prompt/instruction: keys {sorted(row)}")


def render_prompt(tok, messages: list[dict]) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


def load_probe_prompts(path: str | Path) -> list[str]:
    """A JSON list of strings, or of objects with 'prompt' (or 'messages'), or {'prompts': [...]}."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = data.get("prompts", [])
    out = []
    for item in data:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict) and "prompt" in item:
            out.append(item["prompt"])
        elif isinstance(item, dict) and "messages" in item:
            out.append(next(m["content"] for m in item["messages"] if m["role"] == "user"))
        else:
            raise ValueError(f"{path}: probe prompt {item!r} is neither a string nor has 'prompt'")
    return out


# -- generation --------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(model, tok, prompts: list[str], *, max_new_tokens: int = 48, batch_size: int = 32) -> list[str]:
    """Greedy completions of rendered `prompts`, batched with left padding; sorted by length to waste little."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    old_side = tok.padding_side
    tok.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str | None] = [None] * len(prompts)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            for i, seq in zip(idx, new, strict=False):
                out[i] = tok.decode(seq, skip_special_tokens=True).strip()
    finally:
        tok.padding_side = old_side
        model.train(was_training)
    return out


def task_eval(model, tok, rows: list[dict], *, max_new_tokens: int, batch_size: int) -> dict:
    """Accuracy per family on `rows` (each with 'family'). Returns {'families': {f: {correct, total, acc}},
    'mean_acc', 'predictions', 'seconds'}; mean_acc averages the families (not the rows)."""
    from sftfuse.train.tasks import score

    t0 = time.perf_counter()
    prompts = [render_prompt(tok, prompt_messages(r)) for r in rows]
    preds = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    fams: dict[str, dict] = {}
    for row, pred in zip(rows, preds, strict=False):
        f = fams.setdefault(row.get("family", "all"), {"correct": 0, "total": 0})
        f["total"] += 1
        f["correct"] += int(bool(score(row.get("family", "all"), pred, row)))
    for f in fams.values():
        f["acc"] = f["correct"] / f["total"]
    mean = sum(f["acc"] for f in fams.values()) / max(len(fams), 1)
    return {"families": dict(sorted(fams.items())), "mean_acc": mean, "predictions": preds,
            "seconds": time.perf_counter() - t0}


@torch.no_grad()
def answer_nll(model, tok, prompts: list[str], answers: list[str]) -> list[float]:
    """Mean NLL per answer token of each `answers[i]` after the rendered `prompts[i]` (one row at a time)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for p, a in zip(prompts, answers, strict=False):
            p_ids = tok(p, add_special_tokens=False)["input_ids"]
            a_ids = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([p_ids + a_ids], device=device)
            logits = model(input_ids=ids).logits[0, len(p_ids) - 1:-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, len(p_ids):], reduction="mean")
            out.append(float(nll))
    finally:
        model.train(was_training)
    return out


def probe_summary(base_nll: list[float], tuned_nll: list[float]) -> dict:
    b, t = sum(base_nll) / len(base_nll), sum(tuned_nll) / len(tuned_nll)
    return {"n_prompts": len(base_nll), "base_nll": b, "tuned_nll": t, "relative_change": (t - b) / b,
            "base_ppl": math.exp(b), "tuned_ppl": math.exp(t)}
