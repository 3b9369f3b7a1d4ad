"""Shared by the train tests: tiny runs of `sftfuse train` on the bundled data (fixtures in conftest.py).

A run here is a few optimizer steps of a tiny Llama (2 layers, hidden 64) with a 600-token byte-level BPE on a
few dozen rows of two task families, in fp32 so that losses compare exactly between runs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from sftfuse.train.data import bundled_path

ROOT = Path(__file__).resolve().parents[2]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Subprocesses get one thread each: two of them share the 2-core CI machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _rows(split: str, n: int, families=None) -> list[dict]:
    rows = [json.loads(line) for line in bundled_path(split).read_text().splitlines() if line.strip()]
    if families:
        rows = [r for r in rows if r["family"] in families]
    return rows[:n]


def _overrides(tiny_dir, data_dir, out, **kw) -> list[str]:
    """`key=value` options of a tiny run into `out`: 4 steps of 2 x 2 rows, validation and a checkpoint every 2."""
    base = {"model": tiny_dir, "train_file": data_dir / "train.jsonl",
            "validation_file": data_dir / "validation.jsonl", "test_file": data_dir / "test.jsonl",
            "probe_file": data_dir / "probe.json", "output_dir": out, "qlora": False, "patch": False,
            "dtype": "fp32", "lora_r": 4, "lora_alpha": 8, "max_length": 96, "batch_size": 2, "grad_accum": 2,
            "lr": 3e-3, "warmup_steps": 1, "max_steps": 4, "eval_interval": 2, "checkpoint_interval": 2,
            "max_new_tokens": 6, "gen_batch_size": 8, "task_eval": False, "probe": False, "replay_ratio": 0.0}
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def _losses(out: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "sftfuse.train.cli", *args]
