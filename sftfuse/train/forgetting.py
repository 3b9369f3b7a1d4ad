"""Forgetting: what a run loses outside its tasks, measured three ways, and the replay that counters it.

Before training, the base model (a) answers the probe prompts (general requests outside the nine tasks), (b)
answers the general questions of `data/general_qa.json` (short facts the default base model gets right), and
(c) answers the replay prompts of `data/replay_prompts.json` (general requests, disjoint from both probes). After
training the run reports:

- **probe NLL rise**: the mean NLL per token of (a)'s answers under the tuned model, relative to the base model's;
- **probe KL**: the mean per-token KL(base || tuned) over (a)'s answer positions. The base's distribution is kept as
  its top `TOPK` tokens per position plus one "everything else" outcome, so the figure is the KL between those
  (TOPK + 1)-outcome distributions: a lower bound on the full-vocabulary KL (grouping outcomes never raises a KL),
  tight when the base puts little mass outside its top tokens;
- **answer agreement**: of the general questions the base model answers correctly, the share the tuned model still
  answers correctly.

Replay (`replay_ratio`) mixes (c)'s prompts and the base model's own answers into training, learnt like
demonstrations: the tuned model keeps being trained to behave like the base outside the tasks. An answer cut by
`max_new_tokens` is learnt without an end-of-turn token, so replay never teaches the model to stop mid-sentence.
The probes never train: their prompts are disjoint from the replay prompts (a test checks this).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

TOPK = 32  # base-model tokens kept per probe answer position for the KL (the rest lumped as one outcome)
LIMITS = {"nll_rise": 0.10, "agreement": 0.90}  # past either, the report and the console say so plainly


# -- the bundled sets ---------------------------------------------------------------------------------------------


def load_general_qa(path: str | Path) -> list[dict]:
    """[{"question": str, "answers": [accepted lowercase strings]}] from a JSON file; DataError naming it if bad."""
    from sftfuse.train.data_io import DataError

    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the general questions ({e})") from None
    ok = isinstance(items, list) and items and all(
        isinstance(q, dict) and isinstance(q.get("question"), str) and isinstance(q.get("answers"), list)
        and q["answers"] and all(isinstance(a, str) and a for a in q["answers"]) for q in items)
    if not ok:
        raise DataError(f"{path}: expected a JSON list of {{'question': str, 'answers': [str, ...]}}")
    return items


def answer_is_correct(text: str, accepted: list[str]) -> bool:
    """True when one accepted answer occurs in `text` as whole words (case-folded): "Rome" in "It is Rome.", not
    "0" in "-18.0001"."""
    low = text.lower()
    return any(re.search(r"(?<![\w.])" + re.escape(a.lower()) + r"(?![\w])", low) for a in accepted)


def answer_probe(model, tok, qa: list[dict], *, batch_size: int, max_new_tokens: int = 24) -> list[bool]:
    """Greedy answers to the general questions, each scored by `answer_is_correct`."""
    from sftfuse.train.evaluation import generate, user_prompt

    prompts = [user_prompt(tok, q["question"]) for q in qa]
    answers = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [answer_is_correct(a, q["answers"]) for a, q in zip(answers, qa, strict=True)]


def agreement(base_correct: list[bool], tuned_correct: list[bool]) -> dict:
    """Of the questions the base answered correctly, the share the tuned model still answers correctly."""
    kept = [t for b, t in zip(base_correct, tuned_correct, strict=True) if b]
    return {"n_questions": len(base_correct), "base_correct": len(kept), "still_correct": sum(kept),
            "agreement": sum(kept) / len(kept) if kept else math.nan}


# -- token-level figures over the probe answers -------------------------------------------------------------------


def _answer_ids(tok, prompt: str, answer: str, *, end: bool = True) -> tuple[list[int], list[int]]:
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(answer, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if end else [])
    return p_ids, a_ids


@torch.no_grad()
def answer_logprobs(model, tok, prompts: list[str], answers: list[str]):
    """Yields, per (prompt, answer), the log-softmax over the vocabulary at each answer position (A, V) in fp32
    and the answer's token ids (A,); one row at a time, so at most one answer's logits are held."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for p, a in zip(prompts, answers, strict=True):
            p_ids, a_ids = _answer_ids(tok, p, a)
            ids = torch.tensor([p_ids + a_ids], device=device)
            logits = model(input_ids=ids).logits[0, len(p_ids) - 1:-1].float()
            yield torch.log_softmax(logits, dim=-1), ids[0, len(p_ids):]
    finally:
        model.train(was_training)


def base_stats(model, tok, prompts: list[str], answers: list[str]) -> dict:
    """The base model's per-answer NLL and, per answer position, its top-`TOPK` token ids and log-probs."""
    nll, top = [], []
    for lp, tgt in answer_logprobs(model, tok, prompts, answers):
        nll.append(float(-lp.gather(1, tgt[:, None]).mean()))
        v, i = lp.topk(min(TOPK, lp.shape[-1]), dim=-1)
        top.append({"ids": i.tolist(), "logp": [[round(x, 5) for x in row] for row in v.tolist()]})
    return {"nll": nll, "topk": top}


def tuned_stats(model, tok, prompts: list[str], answers: list[str], base_topk: list[dict]) -> dict:
    """The tuned model's per-answer NLL and mean per-token KL(base || tuned) over the (TOPK + 1)-outcome
    distributions (see the module docstring); `base_topk` from `base_stats`."""
    nll, kl_sum, n_tok = [], 0.0, 0
    for (lq, tgt), top in zip(answer_logprobs(model, tok, prompts, answers), base_topk, strict=True):
        nll.append(float(-lq.gather(1, tgt[:, None]).mean()))
        ids = torch.tensor(top["ids"], device=lq.device)
        lp = torch.tensor(top["logp"], dtype=torch.float64, device=lq.device)  # (A, k) base
        lq_k = lq.gather(1, ids).double()  # (A, k) tuned, same tokens
        p_tail = (1 - lp.exp().sum(-1)).clamp_min(1e-12)
        q_tail = (1 - lq_k.exp().sum(-1)).clamp_min(1e-12)
        kl = (lp.exp() * (lp - lq_k)).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
        kl_sum += float(kl.clamp_min(0).sum())
        n_tok += kl.numel()
    return {"nll": nll, "kl": kl_sum / max(n_tok, 1)}


def summary(base_nll: list[float], tuned: dict, answers: dict | None) -> dict:
    """The probe's figures for the report: NLLs and their relative change, KL, answer agreement."""
    b, t = sum(base_nll) / len(base_nll), sum(tuned["nll"]) / len(tuned["nll"])
    out = {"n_prompts": len(base_nll), "base_nll": b, "tuned_nll": t, "relative_change": (t - b) / b,
           "base_ppl": math.exp(b), "tuned_ppl": math.exp(t), "kl": tuned.get("kl")}
    if answers:
        out["answers"] = answers
    return out


def warnings(probe: dict | None, cfg) -> list[str]:
    """Plain sentences for a run past the forgetting limits, each naming the options that lower it."""
    if not probe:
        return []
    levers = (f"raise replay_ratio (now {cfg['replay_ratio']}), or lower lr (now {cfg['lr']}) or max_steps "
              f"(now {cfg['max_steps']})")
    out = []
    if probe["relative_change"] > LIMITS["nll_rise"]:
        out.append(f"FORGETTING: the probe's NLL rose {100 * probe['relative_change']:+.1f}% (limit "
                   f"+{100 * LIMITS['nll_rise']:.0f}%): the tuned model drifted from the base outside the tasks; "
                   f"{levers}.")
    agree = (probe.get("answers") or {}).get("agreement")
    if agree is not None and agree == agree and agree < LIMITS["agreement"]:
        out.append(f"FORGETTING: the tuned model still answers {100 * agree:.0f}% of the general questions the base "
                   f"answered correctly (limit {100 * LIMITS['agreement']:.0f}%); {levers}.")
    return out


# -- rows for training (replay) and for the probe at validation time ---------------------------------------------


def answer_examples(tok, prompts: list[str], answers: list[str], *, finished: list[bool] | None = None,
                    max_length: int) -> list[dict]:
    """Tokenized examples (input_ids, labels with the prompt masked) of rendered `prompts` and `answers`, the way
    the probe scores them; an answer with `finished[i]` False (cut by the token budget) gets no end token."""
    out = []
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        if not a:
            continue
        p_ids, a_ids = _answer_ids(tok, p, a, end=finished is None or finished[i])
        ids = (p_ids + a_ids)[:max_length]
        labels = ([-100] * len(p_ids) + a_ids)[:max_length]
        if any(x != -100 for x in labels[1:]):
            out.append({"input_ids": ids, "labels": labels, "length": len(ids)})
    return out


@torch.no_grad()
def mean_loss(model, rows: list[dict], *, batch_size: int, pad_id: int, packed: bool, mask_dtype, device) -> float:
    """The model's mean loss per labelled token over `rows` (validation rows, or probe answers), in eval mode;
    nan when no row has a labelled token. A patched model computes it with the fused loss (`loss_only`): no logits,
    and only labelled rows reach the head (the default run's validation, 28 packed rows on a 2-core AMD EPYC:
    11.4-14.5 s -> 7.0-8.3 s)."""
    from sftfuse.patch.patcher import loss_only
    from sftfuse.train import data

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with loss_only():
            for s in range(0, len(rows), batch_size):
                b = data.collate(rows[s:s + batch_size], pad_id=pad_id, packed=packed, mask_dtype=mask_dtype)
                n = int((b["labels"][:, 1:] != -100).sum())
                if n == 0:
                    continue
                batch = {k: v.to(device) for k, v in b.items()}
                total += float(model(**batch, use_cache=False).loss) * n
                count += n
    finally:
        model.train(was_training)
    return total / count if count else math.nan
