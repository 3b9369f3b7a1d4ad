"""The base model's evaluation, before any training: test-split accuracy and the forgetting probe's answers.

Rank 0 runs it (the other processes wait for its probe answers on the trainer's control group). It is cached in
`output_dir/base_eval.json` with the options it depends on, so that `--resume` reuses it, and redoes it when one
of them changed (a new test file, say: the "before" column must be the same test as the "after" one).
"""

from __future__ import annotations

import json
from pathlib import Path

from sftfuse.train import evaluation as ev
from sftfuse.train import outdir as od
from sftfuse.train.config import TrainConfig

EVAL_KEYS = ("model", "test_file", "max_test_rows", "task_eval", "probe", "probe_file", "max_new_tokens",
             "gen_batch_size", "replay_ratio")


def probe_prompts(cfg: TrainConfig) -> list[str]:
    from sftfuse.train import data

    return ev.load_probe_prompts(cfg.probe_file or data.bundled_path("probe_prompts"))


def evaluate_base(cfg: TrainConfig, model, tok, test_rows: list[dict], *, cache: Path, resume: bool, rank: int,
                  log) -> dict:
    """{"before", "probe_prompts", "probe_answers", "probe_base_nll"}: from `cache` on resume when its options
    match, else computed (rank 0) and cached; {} on the other processes when computed."""
    settings = {k: getattr(cfg, k) for k in EVAL_KEYS}
    saved = json.loads(cache.read_text()) if resume and cache.exists() else {}
    if saved.get("settings", settings) != settings:
        saved = {}
    if saved or rank != 0:
        return saved
    out = {"before": None, "probe_prompts": [], "probe_answers": [], "probe_base_nll": []}
    if test_rows:
        log(f"evaluating the base model on {len(test_rows)} test rows ...")
        out["before"] = ev.task_eval(model, tok, test_rows, max_new_tokens=cfg.max_new_tokens,
                                     batch_size=cfg.gen_batch_size)
        log(f"base model: mean accuracy over families {100 * out['before']['mean_acc']:.1f}%")
    if cfg.probe or cfg.replay_ratio > 0:
        prompts = [ev.render_prompt(tok, [{"role": "user", "content": p}]) for p in probe_prompts(cfg)]
        answers = ev.generate(model, tok, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size)
        out.update(probe_prompts=prompts, probe_answers=answers,
                   probe_base_nll=ev.answer_nll(model, tok, prompts, answers))
    od.write_atomic(cache, od.json_text({**out, "settings": settings}))
    return out
