"""Does a `sftfuse train mode=full` output directory stand on its own? Load it with plain transformers and score it.

Loads RUN_DIR/model with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` (no sftfuse
code touches the model: no patch, no sftfuse loader), answers the run's test rows greedily with transformers'
`generate`, scores them with the run's own checkers, and compares the accuracy per family with what the run
recorded for its tuned model (results.json "after"). Prints a few answers beside the base model's.

    python scripts/full_output_check.py RUN_DIR [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from sftfuse.train import evaluation as ev
    from sftfuse.train.config import TrainConfig
    from sftfuse.train.run_data import RunData

    res = json.loads((args.run_dir / "results.json").read_text())
    cfg = TrainConfig(**{k: v for k, v in res["config"].items() if k in TrainConfig.__dataclass_fields__})
    model_dir = args.run_dir / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    tok = AutoTokenizer.from_pretrained(model_dir)
    print(
        f"loaded {model_dir} with transformers: {type(model).__name__}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {args.dtype}; "
        f"chat template: {'yes' if tok.chat_template else 'no'}"
    )
    rd = RunData(cfg)
    rd.tokenize(tok, None, lambda msg: None)
    out = ev.task_eval(model, tok, rd.test_rows, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size)
    recorded = res["after"]
    print(f"{'family':<16} {'recorded':>9} {'reloaded':>9}")
    for fam, f in out["families"].items():
        print(f"{fam:<16} {recorded['families'][fam]['acc']:>9.3f} {f['acc']:>9.3f}")
    print(
        f"{'mean':<16} {recorded['mean_acc']:>9.3f} {out['mean_acc']:>9.3f}  "
        f"(base model: {res['before']['mean_acc']:.3f})"
    )
    for row, pred in list(zip(rd.test_rows, out["predictions"], strict=True))[::12][:9]:
        print(f"- [{row.get('family')}] {ev.prompt_messages(row)[-1]['content'][:70]!r}\n    -> {pred[:80]!r}")
    return 0 if abs(out["mean_acc"] - recorded["mean_acc"]) <= 0.03 else 1


if __name__ == "__main__":
    raise SystemExit(main())
