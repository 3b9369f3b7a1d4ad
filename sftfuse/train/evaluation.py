"""What a run gained and what it lost: task accuracy and the forgetting probe (the report: `sftfuse.train.report`).

- Task evaluation: greedy, batched generation (left padding, stop at EOS, `max_new_tokens` short because the
  bundled answers are short) on the test split's prompts, each tokenized as training tokenized its row (a
  prompt/completion row's raw prompt, a chat through the template), scored per family by
  `sftfuse.train.tasks.score` (a family without a checker by normalised exact match, and the result says so).
- Forgetting: the probe prompts and general questions the base model answers before training, and what the
  tuned model makes of them, are `sftfuse.train.forgetting`'s.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from sftfuse.train.data_io import DataError
from sftfuse.train.data_tokenize import prompt_ids, prompt_messages  # noqa: F401  (prompt_messages: API)

# -- prompts -----------------------------------------------------------------------------------------------------


def render_prompt(tok, messages: list[dict]) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


def user_prompt(tok, text: str) -> str:
    """One user message, rendered for generation (the probes', the general questions' and replay's prompts)."""
    return render_prompt(tok, [{"role": "user", "content": text}])


def _probe_text(item) -> str | None:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        return item["prompt"]
    if isinstance(item, dict) and isinstance(item.get("messages"), list):
        users = [m.get("content") for m in item["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        return users[0] if users and isinstance(users[0], str) else None
    return None


def load_probe_prompts(path: str | Path) -> list[str]:
    """A JSON list of strings, or of objects with 'prompt' (or 'messages'), or {'prompts': [...]}.

    Raises:
        DataError: naming the file (and line), when it is not such a list or holds no prompt.
    """
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8-sig"))
    except OSError as e:
        raise DataError(f"{path}: cannot read the probe prompts ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):
        data = data.get("prompts", [])
    out = []
    for i, item in enumerate(data if isinstance(data, list) else [data], 1):
        text = _probe_text(item)
        if text is None:
            raise DataError(f"{path}: probe prompt {i} ({item!r:.60}) is neither a string nor has a 'prompt' or a "
                            f"user message")
        out.append(text)
    if not out:
        raise DataError(f"{path}: no probe prompts (expected a JSON list of strings)")
    return out


# -- generation --------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(model, tok, prompts: list, *, max_new_tokens: int = 48, batch_size: int = 32,
             return_finished: bool = False):
    """Greedy completions of `prompts` (rendered strings, tokenized without special tokens added, or lists of
    token ids), batched with left padding; sorted by length to waste little. With `return_finished`, also whether
    each completion ended with the end token (False: cut by `max_new_tokens`)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids = [list(p) if not isinstance(p, str) else tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str | None] = [None] * len(ids)
    done = [False] * len(ids)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(len(ids[i]) for i in idx)
            input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in idx], device=device)
            mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in idx], device=device)
            gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id)
            for i, seq in zip(idx, gen[:, width:], strict=False):
                out[i] = tok.decode(seq, skip_special_tokens=True).strip()
                done[i] = bool((seq == tok.eos_token_id).any())
    finally:
        model.train(was_training)
    return (out, done) if return_finished else out


def task_eval(model, tok, rows: list[dict], *, max_new_tokens: int, batch_size: int) -> dict:
    """Accuracy per family on `rows` (normalized rows, each with 'family'; none: family "all"). Each prompt is
    tokenized the way training tokenized its row (`data_tokenize.prompt_ids`). Returns {'families': {f: {correct,
    total, acc, scoring}}, 'mean_acc', 'predictions', 'seconds'}; mean_acc averages the families (not the rows);
    `scoring` says whether the family's own checker or normalised exact match scored it (`tasks.scoring`)."""
    from sftfuse.train.tasks import score, scoring

    t0 = time.perf_counter()
    prompts = [prompt_ids(r, tok) for r in rows]
    preds = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    fams: dict[str, dict] = {}
    for row, pred in zip(rows, preds, strict=False):
        fam = row.get("family", "all")
        f = fams.setdefault(fam, {"correct": 0, "total": 0, "scoring": scoring(fam)})
        f["total"] += 1
        f["correct"] += int(bool(score(fam, pred, row)))
    for f in fams.values():
        f["acc"] = f["correct"] / f["total"]
    mean = sum(f["acc"] for f in fams.values()) / max(len(fams), 1)
    return {"families": dict(sorted(fams.items())), "mean_acc": mean, "predictions": preds,
            "seconds": time.perf_counter() - t0}
