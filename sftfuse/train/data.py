"""SFT data: read, validate, tokenize with prompt masking, pack, collate.

Reading. `read_rows` takes a JSONL, JSON (an array of records), CSV or Parquet file, or a directory written by
`datasets.save_to_disk` (`sftfuse.train.data_io`), and reads each record in one of four formats, detected from its
keys unless one is given: Alpaca (`instruction`, optional `input`, `output`), `prompt`/`completion`, chat
`messages` (roles system/user/assistant) or plain `text`. The format is decided per record, so one stray row
cannot make every other row look bad; a file that mixes formats says so in its data report. Every record is
validated; the first bad one (invalid JSON, bytes that are not UTF-8, a missing field, a wrong type, an unknown
role) raises `DataError` with `file:line N` (`row N` for Parquet and `datasets`), or with `skip_bad_rows=True` is
counted and dropped. Rows come out normalized: {"messages": [...]}, {"prompt", "completion"} (Alpaca is rendered
into that with a fixed template) or {"text"}, plus "family" and "answer" when the record has them; each row keeps
its location, so that a row the tokenizer later refuses is named (or skipped) the same way.

Tokenizing (`sftfuse.train.data_tokenize`): labels -100 outside responses, chats through the chat template.

Packing. Best-fit-decreasing puts documents into rows of `max_length` tokens. `position_ids` restart at each
document, the first label of each document is masked (its predecessor belongs to another document) and `collate`
builds a 4-D additive mask (B, 1, T, T) that is causal within a document and blocks everything across documents,
so each document's loss is the same as if it ran alone.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sftfuse.train.data_io import FORMATS, DataError, records
from sftfuse.train.data_report import DataReport, quality_report  # noqa: F401  (part of this module's API)
from sftfuse.train.data_tokenize import prompt_ids, tokenize_rows, tokenize_rowset  # noqa: F401  (API)

ROLES = ("system", "user", "assistant")
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
_MAX_KEPT_ERRORS = 20
_SKIP_HINT = " (pass --skip-bad-rows to skip bad rows)"


@dataclass
class RowSet:
    """Validated, normalized rows of one file, each with its location ("line N", "row N") in `locs`."""

    rows: list[dict]
    fmt: str  # the format of most rows (or the one asked for)
    path: str
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first skipped rows' messages
    locs: list[str] = field(default_factory=list)
    formats: dict = field(default_factory=dict)  # rows per format

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        """The location of row i, "file:line N" ("file:row N" for rows made without locations)."""
        return f"{self.path}:{self.locs[i] if i < len(self.locs) else f'row {i + 1}'}"

    def bad_row(self, msg: str, *, skip: bool) -> None:
        """A bad row (`msg` names file and line): raise DataError, or with `skip` count it."""
        if not skip:
            raise DataError(msg + _SKIP_HINT)
        self.skipped += 1
        if len(self.errors) < _MAX_KEPT_ERRORS:
            self.errors.append(msg)

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows at `indices`; raises DataError when none is left."""
        self.rows = [self.rows[i] for i in indices]
        self.locs = [self.locs[i] for i in indices if i < len(self.locs)]
        if not self.rows:
            raise DataError(f"{self.path}: no valid rows ({self.skipped} bad rows skipped)")


def bundled_path(split: str) -> Path:
    """Path of the bundled dataset's `split` ("train", "validation", "test"), or of a bundled forgetting set:
    "probe_prompts", "replay_prompts" or "general_qa" (`sftfuse.train.forgetting`)."""
    names = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl",
             "probe_prompts": "probe_prompts.json", "replay_prompts": "replay_prompts.json",
             "general_qa": "general_qa.json"}
    if split not in names:
        raise ValueError(f"split={split!r}: expected one of {tuple(names)}")
    return Path(__file__).resolve().parents[1] / "data" / names[split]


# ----------------------------------------------------------------------------------------------- reading

def detect_format(record: dict) -> str:
    """The format of one record from its keys."""
    if not isinstance(record, dict):
        raise DataError(f"a record must be an object, got {type(record).__name__}")
    if "messages" in record:
        return "messages"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    raise DataError(f"cannot detect the format from keys {sorted(record)}: expected 'messages', 'instruction'/"
                    f"'output', 'prompt'/'completion' or 'text'")


def _field(rec: dict, key: str, *, optional: bool = False) -> str:
    if key not in rec or (optional and rec[key] is None):
        if optional:
            return ""
        raise DataError(f"missing field {key!r}")
    v = rec[key]
    if not isinstance(v, str):
        raise DataError(f"field {key!r} must be a string, got {type(v).__name__} {v!r:.40}")
    return v


def normalize_record(rec, fmt: str) -> dict:
    """Validate one record of format `fmt` and return its normalized row (raises DataError without location)."""
    if not isinstance(rec, dict):
        raise DataError(f"a record must be an object, got {type(rec).__name__}")
    if fmt == "messages":
        msgs = rec.get("messages")
        if msgs is None:
            raise DataError("missing field 'messages'")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"field 'messages' must be a non-empty list, got {type(msgs).__name__}")
        out = []
        for j, m in enumerate(msgs, 1):
            if not isinstance(m, dict):
                raise DataError(f"message {j} must be an object, got {type(m).__name__}")
            role, content = _field(m, "role"), _field(m, "content")
            if role not in ROLES:
                raise DataError(f"unknown role {role!r} in message {j} (expected one of {', '.join(ROLES)})")
            out.append({"role": role, "content": content})
        row = {"messages": out}
    elif fmt == "alpaca":
        instruction, inp, output = _field(rec, "instruction"), _field(rec, "input", optional=True), \
            _field(rec, "output")
        tmpl = ALPACA_PROMPT_INPUT if inp.strip() else ALPACA_PROMPT
        row = {"prompt": tmpl.format(instruction=instruction, input=inp), "completion": output}
    elif fmt == "prompt_completion":
        row = {"prompt": _field(rec, "prompt"), "completion": _field(rec, "completion")}
    elif fmt == "text":
        row = {"text": _field(rec, "text")}
    else:
        raise ValueError(f"fmt={fmt!r}: expected one of {FORMATS}")
    if rec.get("family") not in (None, ""):  # an empty CSV cell means no family
        row["family"] = str(rec["family"])
    for extra in ("answer",):  # kept for task checkers
        if rec.get(extra) is not None:
            row[extra] = rec[extra]
    return row


def read_rows(path, *, fmt: str | None = None, skip_bad_rows: bool = False, split: str = "train") -> RowSet:
    """Read and validate a dataset file or `datasets` directory.

    Args:
        path: a .jsonl/.json/.csv/.parquet file or a directory saved by `datasets`.
        fmt: one of FORMATS, or None to detect it per record.
        skip_bad_rows: count and drop bad rows instead of raising.
        split: the role of the file, "train", "validation" or "test": the split read from a DatasetDict directory
            (validation: the first of validation, val, dev, test).

    Raises:
        DataError: naming the file and line (or row) of the first bad record, or the file if it holds no rows.
    """
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: expected one of {FORMATS} or None")
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    out = RowSet(rows=[], fmt=fmt or "", path=str(path))
    counts: Counter = Counter()
    for loc, rec in records(path, split=split):
        try:
            if isinstance(rec, DataError):
                raise rec
            row_fmt = fmt or detect_format(rec)
            out.rows.append(normalize_record(rec, row_fmt))
            out.locs.append(loc)
            counts[row_fmt] += 1
        except DataError as e:
            out.bad_row(f"{path}:{loc}: {e}", skip=skip_bad_rows)
    if not out.rows:
        raise DataError(f"{path}: no valid rows" + (f" ({out.skipped} bad rows skipped)" if out.skipped else ""))
    out.formats = dict(counts.most_common())
    out.fmt = fmt or next(iter(out.formats))
    return out


# ------------------------------------------------------------------------------------- packing, collating

def pack(examples: list[dict], *, max_length: int) -> list[dict]:
    """Best-fit-decreasing packing of tokenized examples into rows of at most `max_length` tokens.

    Returns rows {"input_ids", "labels", "position_ids" (0.. per document), "doc_ids" (document index within the
    row, per token)}. Each document's first label is -100: in a packed row its predecessor is another document.
    Deterministic: ties are broken by input order.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, bin index)
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens > max_length={max_length}: tokenize with that max_length")
        if n == 0:
            continue
        k = bisect.bisect_left(free, (n, -1))  # the fullest bin that still fits
        if k < len(free):
            space, b = free.pop(k)
        else:
            space, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    rows = []
    for docs in bins:
        row = {"input_ids": [], "labels": [], "position_ids": [], "doc_ids": []}
        for d, i in enumerate(docs):
            ex = examples[i]
            n = len(ex["input_ids"])
            row["input_ids"] += ex["input_ids"]
            row["labels"] += [-100] + list(ex["labels"][1:])
            row["position_ids"] += list(range(n))
            row["doc_ids"] += [d] * n
        rows.append(row)
    return rows


def document_mask(doc_ids: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention mask (B, 1, T, T) from per-token document ids (B, T) (-1 = padding).

    0 where a query may attend (same document, key not after query), -inf elsewhere; a padding token attends
    to itself only, so no softmax row is empty.
    """
    b, t = doc_ids.shape
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=doc_ids.device)
    allowed = (same & causal & (doc_ids[:, :, None] >= 0)) | eye
    mask = torch.zeros(b, 1, t, t, dtype=dtype, device=doc_ids.device)
    return mask.masked_fill_(~allowed[:, None], float("-inf"))


def collate(batch: list[dict], *, pad_id: int, packed: bool, pad_to: int | None = None,
            mask_dtype: torch.dtype = torch.float32) -> dict:
    """Pad a batch (right padding) into tensors.

    Returns input_ids, labels (-100 on padding) and position_ids, all (B, T), plus "attention_mask": for packed
    rows the 4-D additive document mask (B, 1, T, T) in `mask_dtype`, otherwise the usual (B, T) 0/1 mask.
    T is the longest row, or `pad_to` when given.
    """
    if not batch:
        raise ValueError("batch: expected at least one example")
    t = max(len(ex["input_ids"]) for ex in batch)
    if pad_to is not None:
        if pad_to < t:
            raise ValueError(f"pad_to={pad_to} < longest row {t}")
        t = pad_to
    b = len(batch)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    labels = torch.full((b, t), -100, dtype=torch.long)
    pos = torch.zeros((b, t), dtype=torch.long)
    docs = torch.full((b, t), -1, dtype=torch.long)
    for r, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[r, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[r, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        pos[r, :n] = torch.tensor(ex["position_ids"]) if "position_ids" in ex else torch.arange(n)
        docs[r, :n] = torch.tensor(ex["doc_ids"]) if packed and "doc_ids" in ex else 0
    out = {"input_ids": ids, "labels": labels, "position_ids": pos}
    out["attention_mask"] = document_mask(docs, dtype=mask_dtype) if packed else (docs >= 0).long()
    return out
