"""The data of one `sftfuse train` run: read, then tokenized and checked with the model's tokenizer loaded on its
own, all before the model loads (a bad row, a row the tokenizer refuses, or data with nothing to learn fails in
seconds, not after a load and a base evaluation); then mixed with replayed base-model answers, packed, and drawn as a
resumable stream of step batches. `sftfuse data-check` runs the same reading and checks.

The stream: row k of the run is row `perm_e[k mod n]` of epoch e = k // n, each epoch shuffled by its own seed
(`seed * 1_000_003 + e`), so a resumed run needs only the number of rows consumed to continue where it stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sftfuse.train import base_eval, data, tasks
from sftfuse.train.config import TrainConfig
from sftfuse.train.data_tokenize import prompt_messages
from sftfuse.train.models import load_tokenizer


def _has_response(example: dict) -> bool:
    return any(lab != -100 for lab in example["labels"][1:])


class RunData:
    """Train, validation and test data of one run. `RunData(cfg)` reads the files; `check_tokens` tokenizes them
    with the model's tokenizer loaded on its own, before the model (`tokenize` does it then if it was not done);
    `build_train_rows` follows once the base model's probe answers are at hand. `sftfuse data-check` runs the
    same reading and checks, so the two agree on what is an error."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        bundled = cfg.train_file is None
        train_path = cfg.train_file or data.bundled_path("train")
        val_path = cfg.validation_file or (data.bundled_path("validation") if bundled else None)
        test_path = cfg.test_file or (data.bundled_path("test") if bundled else None)

        def read(path, split):
            return data.read_rows(path, fmt=cfg.data_format, skip_bad_rows=cfg.skip_bad_rows, split=split)

        self.train_set = read(train_path, "train")
        self.val_set = read(val_path, "validation") if val_path else None
        self.test_set = read(test_path, "test") if test_path and cfg.task_eval else None
        if self.test_set is not None:
            self._check_test_rows()
        if cfg.probe:  # read later, after the model: checked now
            base_eval.probe_prompts(cfg)
        if cfg.replay_ratio > 0:
            base_eval.replay_prompts(cfg)
        self.train_examples: list[dict] | None = None
        self.val_examples: list[dict] = []
        self.val_rows: list[dict] = []
        self.test_rows: list[dict] = []
        self.train_rows: list[dict] = []
        self._perm: list[int] = []
        self._perm_epoch: int | None = None

    def _check_test_rows(self) -> None:
        """Every test row needs a prompt to answer and a reference to score against."""
        ts, kept = self.test_set, []
        for i, row in enumerate(ts.rows):
            if "text" in row:
                problem = "a text row has no prompt to answer (use messages or prompt/completion rows)"
            elif not prompt_messages(row):
                problem = "the chat has no turn before its answer"
            elif tasks.reference(row) is None:
                problem = "no 'answer', assistant message or completion to score the reply against"
            else:
                kept.append(i)
                continue
            ts.bad_row(f"{ts.where(i)}: test row: {problem}", skip=self.cfg.skip_bad_rows)
        if len(kept) < len(ts.rows):
            ts.keep(kept)

    def check_tokens(self, tok=None):
        """Tokenize train and validation rows with `tok` (default: the run's tokenizer loaded on its own,
        `models.load_tokenizer(cfg.model)`), so that a row the tokenizer refuses, training data with no response
        token or validation data with none fail before the model loads. Returns the tokenizer.

        Raises:
            DataError: naming the file (and line of a bad row).
        """
        cfg = self.cfg
        tok = tok if tok is not None else load_tokenizer(cfg.model)
        kw = {"max_length": cfg.max_length, "skip_bad_rows": cfg.skip_bad_rows}
        examples = data.tokenize_rowset(self.train_set, tok, **kw)
        if not any(map(_has_response, examples)):
            raise data.DataError(f"{self.train_set.path}: no training example has a response token "
                                 f"({len(examples)} rows; check the data format, and max_length={cfg.max_length}: "
                                 f"a prompt as long as it leaves nothing to learn)")
        if self.val_set is not None:
            self.val_examples = [e for e in data.tokenize_rowset(self.val_set, tok, **kw) if _has_response(e)]
            if not self.val_examples:
                raise data.DataError(f"{self.val_set.path}: no validation row has a response token (max_length="
                                     f"{cfg.max_length}): validation loss and early stopping would be off; fix "
                                     f"the file or leave validation_file unset")
        self.train_examples = examples
        return tok

    def report(self) -> data.DataReport:
        """The data-quality report of the tokenized training data (with validation overlap and test notes)."""
        rep = data.quality_report(self.train_set, self.train_examples, max_length=self.cfg.max_length,
                                  val_rows=self.val_set.rows if self.val_set else None)
        if self.test_set is not None:
            fams = sorted({r.get("family", "all") for r in self.test_set.rows} - set(tasks.FAMILY_NAMES))
            if fams:
                rep.notes.append(f"test families scored by {tasks.EXACT_MATCH} (no task checker): "
                                 f"{', '.join(fams)}")
        return rep

    def tokenize(self, tok, out_dir: Path | None, log) -> str:
        """Tokenize train and validation rows (unless `check_tokens` did), cut the test rows, and write the
        data-quality report to `out_dir` (None: not written, as on ranks other than 0). Returns its markdown."""
        cfg = self.cfg
        if self.train_examples is None:
            self.check_tokens(tok)
        if self.val_set is not None:
            rows = data.pack(self.val_examples, max_length=cfg.max_length) if cfg.packing else self.val_examples
            self.val_rows = rows[:cfg.max_eval_rows] if cfg.max_eval_rows else rows
        if self.test_set is not None:
            self.test_rows = self.test_set.rows
            if cfg.max_test_rows:
                self.test_rows = self.test_rows[:cfg.max_test_rows]
        report = self.report()
        data_md = report.to_markdown()
        if out_dir is not None:
            (out_dir / "data_report.md").write_text(data_md + "\n")
            (out_dir / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
            for line in report.summary_lines():
                log(line)
        return data_md

    def build_train_rows(self, tok, *, replay: list[dict], world: int, log) -> int:
        """Training rows (with `replay_ratio` x examples of the tokenized `replay` answers mixed in, cycled), packed;
        returns the number of steps."""
        cfg = self.cfg
        examples = [e for e in self.train_examples if _has_response(e)]
        if cfg.replay_ratio > 0 and replay:
            # Replay: the base model's own answers, learnt like demonstrations, pull the model back to itself.
            n = round(cfg.replay_ratio * len(examples))
            examples += [replay[i % len(replay)] for i in range(n)]
            log(f"replay: {n} base-model answers ({len(replay)} prompts) mixed into {len(examples) - n} examples")
        if not examples:
            raise data.DataError(f"{self.train_set.path}: no training example has a response token")
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
