"""The data of one `sftfuse train` run: read before the model loads, tokenized and checked once the tokenizer is
there, mixed with replayed probe answers, packed, and drawn as a resumable stream of step batches.

The stream: row k of the run is row `perm_e[k mod n]` of epoch e = k // n, each epoch shuffled by its own seed
(`seed * 1_000_003 + e`), so a resumed run needs only the number of rows consumed to continue where it stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sftfuse.train import data
from sftfuse.train.config import TrainConfig


def _has_response(example: dict) -> bool:
    return any(lab != -100 for lab in example["labels"][1:])


class RunData:
    """Train, validation and test data of one run. `RunData(cfg)` reads the files; `tokenize` and `build_train_rows`
    follow once the tokenizer (and the base model's probe answers) are at hand."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        bundled = cfg.train_file is None
        train_path = cfg.train_file or data.bundled_path("train")
        val_path = cfg.validation_file or (data.bundled_path("validation") if bundled else None)
        test_path = cfg.test_file or (data.bundled_path("test") if bundled else None)
        read = lambda p: data.read_rows(p, fmt=cfg.data_format, skip_bad_rows=cfg.skip_bad_rows)  # noqa: E731
        self.train_set = read(train_path)
        self.val_set = read(val_path) if val_path else None
        self.test_set = read(test_path) if test_path and cfg.task_eval else None
        self.val_rows: list[dict] = []
        self.test_rows: list[dict] = []
        self.train_rows: list[dict] = []
        self._perm: list[int] = []
        self._perm_epoch: int | None = None

    def tokenize(self, tok, out_dir: Path | None, log) -> str:
        """Tokenize train and validation rows, cut the test rows, and write the data-quality report to `out_dir`
        (None: not written, as on ranks other than 0). Returns the report's markdown."""
        cfg = self.cfg
        self.train_examples = data.tokenize_rows(self.train_set.rows, tok, max_length=cfg.max_length,
                                                 fmt=self.train_set.fmt)
        val_set = self.val_set
        if val_set is not None:
            ex = data.tokenize_rows(val_set.rows, tok, max_length=cfg.max_length, fmt=val_set.fmt)
            ex = [e for e in ex if _has_response(e)]
            rows = data.pack(ex, max_length=cfg.max_length) if cfg.packing else ex
            self.val_rows = rows[:cfg.max_eval_rows] if cfg.max_eval_rows else rows
        if self.test_set is not None:
            self.test_rows = self.test_set.rows
            if cfg.max_test_rows:
                self.test_rows = self.test_rows[:cfg.max_test_rows]
        report = data.quality_report(self.train_set, self.train_examples, max_length=cfg.max_length,
                                     val_rows=val_set.rows if val_set else None)
        data_md = report.to_markdown()
        if out_dir is not None:
            (out_dir / "data_report.md").write_text(data_md + "\n")
            (out_dir / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
            for line in report.summary_lines():
                log(line)
        return data_md

    def build_train_rows(self, tok, *, probe_texts: list[str], probe_answers: list[str], world: int, log) -> int:
        """Training rows (with `replay_ratio` of replayed probe answers), packed; returns the number of steps."""
        cfg = self.cfg
        examples = [e for e in self.train_examples if _has_response(e)]
        if cfg.replay_ratio > 0 and probe_answers:
            # Replay: the base model's own answers, learnt like demonstrations, pull the model back to itself.
            n = round(cfg.replay_ratio * len(examples))
            msgs = [[{"role": "user", "content": p}, {"role": "assistant", "content": a}]
                    for p, a in zip(probe_texts, probe_answers, strict=False) if a]
            rows = [{"messages": msgs[i % len(msgs)]} for i in range(n)] if msgs else []
            examples += data.tokenize_rows(rows, tok, max_length=cfg.max_length, fmt="messages")
            log(f"replay: {len(rows)} base-model answers mixed into {len(examples) - len(rows)} examples")
        if not examples:
            raise ValueError("no training example has a response token: check the data format and max_length")
        self.train_rows = data.pack(examples, max_length=cfg.max_length) if cfg.packing else examples
        per_step = cfg.batch_size * cfg.grad_accum * world
        total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.train_rows) / per_step))
        log(f"train: {len(examples)} examples -> {len(self.train_rows)} rows of <= {cfg.max_length} tokens; "
            f"{total_steps} steps of {per_step} rows")
        return total_steps

    def _row_index(self, k: int) -> int:
        """k-th row of the stream: epoch k // n shuffled with its own seed, so any position can be resumed."""
        n = len(self.train_rows)
        epoch = k // n
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(n, generator=g).tolist(), epoch
        return self._perm[k % n]

    def step_batches(self, consumed: int, *, world: int, rank: int, pad_id: int, mask_dtype) -> list[dict]:
        """This process's `grad_accum` micro-batches of the step that starts at row `consumed` of the stream (a
        step takes batch_size x grad_accum x world rows); each carries its "n_input_tokens"."""
        cfg = self.cfg
        bs = cfg.batch_size
        out = []
        for j in range(cfg.grad_accum):
            start = consumed + (j * world + rank) * bs
            rows = [self.train_rows[self._row_index(k)] for k in range(start, start + bs)]
            b = data.collate(rows, pad_id=pad_id, packed=cfg.packing, mask_dtype=mask_dtype)
            b["n_input_tokens"] = sum(len(r["input_ids"]) for r in rows)
            out.append(b)
        return out
