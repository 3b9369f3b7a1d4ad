"""The base model's evaluation, before any training: test-split accuracy, and the answers the forgetting figures
and replay need (`sftfuse.train.forgetting`): the probe prompts' (with their NLL and top tokens), the general
questions' (scored), and the replay prompts' (when `replay_ratio` > 0).

Rank 0 runs it (the other processes wait for its probe answers on the trainer's control group). It is cached in
`output_dir/base_eval.json` with the options it depends on, so that `--resume` reuses it, and redoes it when one
of them changed (a new test file, say: the "before" column must be the same test as the "after" one).
"""

from __future__ import annotations

import json
from pathlib import Path

from sftfuse.train import evaluation as ev
from sftfuse.train import forgetting as fg
from sftfuse.train import outdir as od
from sftfuse.train.config import TrainConfig

EVAL_KEYS = ("model", "test_file", "max_test_rows", "task_eval", "probe", "probe_file", "max_new_tokens",
             "gen_batch_size", "replay_ratio", "replay_file")


def probe_prompts(cfg: TrainConfig) -> list[str]:
    from sftfuse.train import data

    return ev.load_probe_prompts(cfg.probe_file or data.bundled_path("probe_prompts"))


def replay_prompts(cfg: TrainConfig) -> list[str]:
    from sftfuse.train import data

    return ev.load_probe_prompts(cfg.replay_file or data.bundled_path("replay_prompts"))


def general_qa() -> list[dict]:
    from sftfuse.train import data

    return fg.load_general_qa(data.bundled_path("general_qa"))


def _forgetting_base(cfg: TrainConfig, model, tok, log) -> dict:
    out = {}
    if cfg.probe:
        log("the base model answers the forgetting probe and the general questions ...")
        prompts = [ev.user_prompt(tok, p) for p in probe_prompts(cfg)]
        answers = ev.generate(model, tok, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size)
        stats = fg.base_stats(model, tok, prompts, answers)
        out.update(probe_prompts=prompts, probe_answers=answers, probe_base_nll=stats["nll"],
                   probe_topk=stats["topk"],
                   qa_base_correct=fg.answer_probe(model, tok, general_qa(), batch_size=cfg.gen_batch_size))
    if cfg.replay_ratio > 0:
        prompts = [ev.user_prompt(tok, p) for p in replay_prompts(cfg)]
        log(f"the base model answers {len(prompts)} replay prompts ...")
        answers, done = ev.generate(model, tok, prompts, max_new_tokens=cfg.max_new_tokens,
                                    batch_size=cfg.gen_batch_size, return_finished=True)
        out.update(replay_prompts=prompts, replay_answers=answers, replay_finished=done)
    return out


def evaluate_base(cfg: TrainConfig, model, tok, test_rows: list[dict], *, cache: Path, resume: bool, rank: int,
                  log) -> dict:
    """{"before", "probe_prompts", "probe_answers", "probe_base_nll", "probe_topk", "qa_base_correct",
    "replay_prompts", "replay_answers", "replay_finished"}: from `cache` on resume when its options match, else
    computed (rank 0) and cached; {} on the other processes when computed."""
    settings = {k: getattr(cfg, k) for k in EVAL_KEYS}
    saved = json.loads(cache.read_text()) if resume and cache.exists() else {}
    if saved.get("settings", settings) != settings:
        saved = {}
    if saved or rank != 0:
        return saved
    out = {"before": None, "probe_prompts": [], "probe_answers": [], "probe_base_nll": [], "probe_topk": [],
           "qa_base_correct": [], "replay_prompts": [], "replay_answers": [], "replay_finished": []}
    if test_rows:
        log(f"evaluating the base model on {len(test_rows)} test rows ...")
        out["before"] = ev.task_eval(model, tok, test_rows, max_new_tokens=cfg.max_new_tokens,
                                     batch_size=cfg.gen_batch_size)
        log(f"base model: mean accuracy over families {100 * out['before']['mean_acc']:.1f}%")
    out.update(_forgetting_base(cfg, model, tok, log))
    od.write_atomic(cache, od.json_text({**out, "settings": settings}))
    return out
