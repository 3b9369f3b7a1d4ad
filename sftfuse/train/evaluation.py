"""What a run gained and what it lost: task accuracy, the forgetting probe, the loss curve and the report.

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


# -- loss curve and report ---------------------------------------------------------------------------------------


def plot_losses(metrics: list[dict], path: str | Path) -> Path | None:
    """Train loss per step and validation loss per evaluation, one PNG (matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=False), label="train", lw=1)
    if val:
        ax.plot(*zip(*val, strict=False), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean NLL per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def accuracy_table(before: dict | None, after: dict | None) -> str:
    fams = sorted(set((before or {}).get("families", {})) | set((after or {}).get("families", {})))
    lines = ["| family | rows | before | after | change |", "| --- | --- | --- | --- | --- |"]
    for f in fams:
        b = (before or {}).get("families", {}).get(f)
        a = (after or {}).get("families", {}).get(f)
        n = (a or b)["total"]
        delta = f"{100 * (a['acc'] - b['acc']):+.1f} pts" if a and b else ""
        lines.append(f"| {f} | {n} | {_pct(b['acc']) if b else '-'} | {_pct(a['acc']) if a else '-'} | {delta} |")
    if before and after:
        lines.append(f"| **mean over families** | | **{_pct(before['mean_acc'])}** | **{_pct(after['mean_acc'])}** | "
                     f"**{100 * (after['mean_acc'] - before['mean_acc']):+.1f} pts** |")
    return "\n".join(lines)


def write_report(path: str | Path, *, cfg: dict, data_md: str | None, before: dict | None, after: dict | None,
                 probe: dict | None, run: dict, loss_png: str | None) -> Path:
    """report.md: data report, accuracy before/after, forgetting probe, loss curve, throughput, peak memory."""
    lines = ["# sftfuse train report", ""]
    lines += [(f"Model: `{run.get('model')}`; QLoRA: {cfg['qlora']}; LoRA r={cfg['lora_r']} alpha={cfg['lora_alpha']} "
              f"on {', '.join(cfg['target_modules'])}; dtype {run.get('dtype')}; patched: {cfg['patch']}; "
              f"{run.get('world_size', 1)} process(es) on {run.get('device')}."), ""]
    lines += ["## Task accuracy on the test split (before vs after)", ""]
    if before or after:
        lines += [accuracy_table(before, after), ""]
        if before and after:
            worse = [f for f in after["families"] if after["families"][f]["acc"] < before["families"][f]["acc"]]
            lines += [f"Families worse than the base: {', '.join(worse) if worse else 'none'}.", ""]
    else:
        lines += ["Not run (no test file, or task_eval=false).", ""]
    lines += ["## Forgetting probe", ""]
    if probe:
        lines += [(f"The base model's own greedy answers to {probe['n_prompts']} general prompts (outside the training "
                  f"tasks): mean NLL per token {probe['base_nll']:.3f} under the base model, {probe['tuned_nll']:.3f} "
                  f"under the tuned model: **{100 * probe['relative_change']:+.1f}%** "
                  f"(perplexity {probe['base_ppl']:.2f} -> {probe['tuned_ppl']:.2f}). "
                  f"Replay ratio: {cfg['replay_ratio']}."), ""]
    else:
        lines += ["Not run (probe=false).", ""]
    lines += ["## Training", ""]
    early = "; stopped early" if run["stopped_early"] else ""
    lines += [f"- steps: {run['steps']} (of {run['planned_steps']} planned){early}",
              f"- final train loss: {run['final_loss']:.4f}" if run.get("final_loss") is not None else "- no steps",
              f"- best validation loss: {run['best_val_loss']:.4f} at step {run['best_step']} (its adapter is kept)"
              if run.get("best_val_loss") is not None else "- no validation",
              (f"- throughput: {run['tokens_per_s']:.0f} tokens/s ({run['train_tokens']} tokens, "
              f"{run['train_seconds']:.0f} s of training)"),
              f"- peak memory: {run['peak_memory']}",
              (f"- wall time: {run['wall_seconds']:.0f} s in all (model load {run['load_seconds']:.0f} s, "
              f"evaluations and probe {run['eval_seconds']:.0f} s); process CPU time {run['cpu_seconds']:.0f} s "
              f"on {run['threads']} threads"), ""]
    if loss_png:
        lines += [f"![loss curve]({loss_png})", ""]
    lines += ["## Data report", "", data_md or "(none)", ""]
    lines += ["## Config", "", "```yaml"]
    import yaml

    lines += [yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", ""]
    Path(path).write_text("\n".join(lines))
    return Path(path)
