"""SFT data: read, validate, tokenize with prompt masking, pack, collate.

Reading. `read_rows` takes a JSONL, JSON (an array of records), CSV or Parquet file, or a directory written by
`datasets.save_to_disk`, and detects one of four formats from the first record's keys: Alpaca (`instruction`,
optional `input`, `output`), `prompt`/`completion`, chat `messages` (roles system/user/assistant) or plain `text`.
Every record is validated; the first bad one (invalid JSON, a missing field, a wrong type, an unknown role) raises
`DataError` with `file:line N` (`row N` for Parquet and `datasets`), or with `skip_bad_rows=True` is counted and
dropped. Rows come out normalized: {"messages": [...]}, {"prompt", "completion"} (Alpaca is rendered into that with
a fixed template) or {"text"}, plus "family" when the record has one.

Tokenizing. Labels are -100 on every token the model should not learn to produce: the prompt, and for chats
everything outside assistant turns. A chat is rendered once with the tokenizer's chat template; each assistant
turn's character span is found by rendering the conversation up to it (with the generation prompt) and up to its
end, which works for any template that renders a conversation as a prefix of a longer one; templates that rewrite
earlier turns (e.g. dropping reasoning) fall back to locating the turn's text. Token labels then follow from the
fast tokenizer's character offsets. Responses end with EOS (the chat template's end-of-turn token where it is EOS).

Packing. Best-fit-decreasing puts documents into rows of `max_length` tokens. `position_ids` restart at each
document, the first label of each document is masked (its predecessor belongs to another document) and `collate`
builds a 4-D additive mask (B, 1, T, T) that is causal within a document and blocks everything across documents,
so each document's loss is the same as if it ran alone.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sftfuse.train.data_io import DataError, records
from sftfuse.train.data_report import DataReport, quality_report  # noqa: F401  (part of this module's API)

FORMATS = ("alpaca", "prompt_completion", "messages", "text")
ROLES = ("system", "user", "assistant")
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
_MAX_KEPT_ERRORS = 20


@dataclass
class RowSet:
    """Validated, normalized rows of one file."""

    rows: list[dict]
    fmt: str
    path: str
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first skipped rows' messages

    def __len__(self) -> int:
        return len(self.rows)


def bundled_path(split: str) -> Path:
    """Path of the bundled dataset's `split` ("train", "validation", "test") or "probe_prompts"."""
    names = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl",
             "probe_prompts": "probe_prompts.json"}
    if split not in names:
        raise ValueError(f"split={split!r}: expected one of {tuple(names)}")
    return Path(__file__).resolve().parents[1] / "data" / names[split]


def default_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer: from the model cache when present, else through load_default_model."""
    from transformers import AutoTokenizer

    from sftfuse.train.models import cache_dir, load_default_model

    cached = cache_dir() / "SmolLM2-135M-Instruct"
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    return load_default_model()[1]


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
        if extra in rec:
            row[extra] = rec[extra]
    return row


def read_rows(path, *, fmt: str | None = None, skip_bad_rows: bool = False) -> RowSet:
    """Read and validate a dataset file or `datasets` directory.

    Args:
        path: a .jsonl/.json/.csv/.parquet file or a directory saved by `datasets`.
        fmt: one of FORMATS, or None to detect it from the first record.
        skip_bad_rows: count and drop bad rows instead of raising.

    Raises:
        DataError: naming the file and line (or row) of the first bad record, or the file if it holds no rows.
    """
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: expected one of {FORMATS} or None")
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    out = RowSet(rows=[], fmt=fmt or "", path=str(path))
    for loc, rec in records(path):
        try:
            if isinstance(rec, DataError):
                raise rec
            if not out.fmt:
                out.fmt = detect_format(rec)
            out.rows.append(normalize_record(rec, out.fmt))
        except DataError as e:
            msg = f"{path}:{loc}: {e}"
            if not skip_bad_rows:
                raise DataError(msg + " (pass --skip-bad-rows to skip bad rows)") from None
            out.skipped += 1
            if len(out.errors) < _MAX_KEPT_ERRORS:
                out.errors.append(msg)
    if not out.rows:
        raise DataError(f"{path}: no valid rows" + (f" ({out.skipped} bad rows skipped)" if out.skipped else ""))
    return out


# -------------------------------------------------------------------------------------------- tokenizing

def _chat_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans [start, end) of its assistant turns (end-of-turn included)."""
    render = tokenizer.apply_chat_template
    full = render(messages, tokenize=False)
    eos = tokenizer.eos_token or ""
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = upto = None
        if i:  # a chat opening with an assistant turn has no prefix to render: use the fallback
            try:
                before = render(messages[:i], tokenize=False, add_generation_prompt=True)
                upto = render(messages[: i + 1], tokenize=False)
            except Exception:  # noqa: BLE001  (a template may refuse a partial chat)
                before = upto = None
        if before is not None and full.startswith(upto) and upto.startswith(before) and len(before) >= cursor:
            start, end = len(before), len(upto)
            k = full.rfind(eos, start, end) if eos else -1
            if k >= 0:  # stop after the end-of-turn token: trailing newlines belong to the template
                end = k + len(eos)
        else:  # the template rewrites earlier turns: locate the turn's text itself
            start = full.find(m["content"], cursor)
            if start < 0:
                raise DataError(f"assistant message {i + 1} not found in the rendered chat template")
            end = start + len(m["content"])
            if eos and full.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
        cursor = end
    return full, spans


def _tokenize_one(row: dict, tokenizer) -> tuple[list[int], list[int]]:
    eos_id = tokenizer.eos_token_id
    if "messages" in row:
        full, spans = _chat_spans(row["messages"], tokenizer)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [-100] * len(ids)
        si = 0
        for t, (a, b) in enumerate(enc["offset_mapping"]):
            while si < len(spans) and a >= spans[si][1]:
                si += 1
            if si < len(spans) and spans[si][0] <= a < spans[si][1] and b > a:
                labels[t] = ids[t]
        trained = [t for t, lab in enumerate(labels) if lab != -100]
        if row["messages"][-1]["role"] == "assistant" and eos_id is not None and trained \
                and ids[trained[-1]] != eos_id:  # a template that does not end turns with EOS
            ids.append(eos_id)
            labels.append(eos_id)
        return ids, labels
    if "text" in row:
        ids = list(tokenizer(row["text"])["input_ids"])
        if eos_id is not None and (not ids or ids[-1] != eos_id):
            ids.append(eos_id)
        return ids, list(ids)
    prompt = list(tokenizer(row["prompt"])["input_ids"])
    if eos_id is not None and prompt and prompt[-1] == eos_id:  # tokenizers that append EOS to every text
        prompt.pop()
    resp = list(tokenizer(row["completion"], add_special_tokens=False)["input_ids"])
    if eos_id is not None:
        resp.append(eos_id)
    return prompt + resp, [-100] * len(prompt) + resp


def tokenize_rows(rows: list[dict], tokenizer, *, max_length: int, fmt: str) -> list[dict]:
    """Tokenize normalized rows with prompt masking, EOS on responses and truncation to `max_length`.

    Returns one dict per row: "input_ids" and "labels" (lists of length <= max_length, labels -100 on prompt /
    non-assistant tokens), "truncated", "n_response_lost" (response tokens cut off), "prompt_cut" (the cut fell
    before the first response token) and "length" (tokens before truncation).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: expected one of {FORMATS}")
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: expected >= 2")
    if any("messages" in r for r in rows) and not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat template: chat rows need one (or use prompt/completion rows)")
    out = []
    for row in rows:
        ids, labels = _tokenize_one(row, tokenizer)
        n = len(ids)
        first_resp = next((t for t, lab in enumerate(labels) if lab != -100), None)
        lost = sum(lab != -100 for lab in labels[max_length:])
        out.append({"input_ids": ids[:max_length], "labels": labels[:max_length], "truncated": n > max_length,
                    "n_response_lost": lost, "prompt_cut": first_resp is not None and first_resp >= max_length,
                    "length": n})
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
