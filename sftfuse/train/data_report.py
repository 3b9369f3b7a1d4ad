"""The data-quality report shown before training and by `sftfuse data-check` (re-exported by sftfuse.train.data).

What it counts, and how:
- exact duplicates: rows whose whole text (prompt and response) equals an earlier row's;
- near duplicates: rows that are not exact duplicates but equal an earlier row after normalization (lower case,
  punctuation dropped, whitespace collapsed);
- empty responses: a completion or an assistant turn that is empty or whitespace only;
- prompt-only rows: chats without an assistant turn (nothing to learn from);
- truncation: rows cut by max_length, rows whose prompt alone exceeds it, and the share of response tokens lost;
- train/validation overlap: validation rows whose normalized text, or normalized prompt, occurs in the training set;
- formats: rows per format, a warning when a file mixes them (each row is read in its own format).
"""

from __future__ import annotations

import re
import string
from dataclasses import asdict, dataclass, field

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_text(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: the key for near duplicates and overlap."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def row_parts(row: dict) -> tuple[str, list[str]]:
    """(prompt text, response texts) of a normalized row; a `text` row is all response."""
    if "messages" in row:
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in row["messages"] if m["role"] != "assistant")
        return prompt, [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    if "text" in row:
        return "", [row["text"]]
    return row["prompt"], [row["completion"]]


def row_text(row: dict) -> str:
    if "messages" in row:
        return "\n".join(f"{m['role']}: {m['content']}" for m in row["messages"])
    prompt, responses = row_parts(row)
    return prompt + "\n" + "\n".join(responses)


def _percentile(sorted_vals: list[int], q: float) -> int:
    if not sorted_vals:
        return 0
    k = min(len(sorted_vals) - 1, max(0, round(q / 100 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


@dataclass
class DataReport:
    path: str
    fmt: str
    rows: int
    skipped_rows: int
    tokens: int  # after truncation
    response_tokens: int  # after truncation
    exact_duplicates: int
    near_duplicates: int
    empty_responses: int
    prompt_only_rows: int
    truncated_rows: int
    prompts_cut: int
    response_tokens_lost: int
    response_tokens_lost_share: float
    max_length: int
    length_percentiles: dict = field(default_factory=dict)  # tokens before truncation: p50, p90, p95, p99, max
    val_rows: int | None = None
    val_overlap_rows: int | None = None  # same normalized text as a training row
    val_prompt_overlap_rows: int | None = None  # same normalized prompt
    families: dict = field(default_factory=dict)
    formats: dict = field(default_factory=dict)  # rows per format
    notes: list = field(default_factory=list)  # facts the run adds (e.g. how test families are scored)

    def to_dict(self) -> dict:
        return asdict(self)

    def warnings(self) -> list[str]:
        w = []
        if self.skipped_rows:
            w.append(f"{self.skipped_rows} bad rows skipped")
        if len(self.formats) > 1:
            w.append(f"rows of several formats ({', '.join(f'{k} {v}' for k, v in self.formats.items())}): each "
                     f"row is read in its own format")
        if self.exact_duplicates or self.near_duplicates:
            w.append(f"{self.exact_duplicates} exact and {self.near_duplicates} near duplicate rows")
        if self.empty_responses:
            w.append(f"{self.empty_responses} empty or whitespace responses")
        if self.prompt_only_rows:
            w.append(f"{self.prompt_only_rows} prompt-only rows (no response to learn)")
        if self.truncated_rows:
            w.append(f"{self.truncated_rows} rows cut by max_length={self.max_length} ({self.prompts_cut} in the "
                     f"prompt); {self.response_tokens_lost_share:.1%} of response tokens lost")
        if self.val_overlap_rows or self.val_prompt_overlap_rows:
            w.append(f"{self.val_overlap_rows} validation rows duplicate a training row "
                     f"({self.val_prompt_overlap_rows} share its prompt)")
        return w

    def summary_lines(self) -> list[str]:
        p = self.length_percentiles
        lines = [
            (f"data: {self.path} ({self.fmt}): {self.rows} rows, {self.tokens:,} tokens "
            f"({self.response_tokens:,} trained), length p50 {p.get('p50')} / p95 {p.get('p95')} / "
            f"max {p.get('max')} tokens"),
        ]
        if self.val_rows is not None:
            lines.append(f"validation: {self.val_rows} rows, {self.val_overlap_rows} overlap training")
        lines += [f"warning: {w}" for w in self.warnings()] or ["no data problems found"]
        return lines + [f"note: {n}" for n in self.notes]

    def to_markdown(self) -> str:
        p = self.length_percentiles
        rows = [
            ("file", f"`{self.path}` ({self.fmt})"), ("rows", self.rows), ("bad rows skipped", self.skipped_rows),
            ("tokens (after truncation)", f"{self.tokens:,}"), ("response tokens", f"{self.response_tokens:,}"),
            ("exact duplicates", self.exact_duplicates), ("near duplicates", self.near_duplicates),
            ("empty / whitespace responses", self.empty_responses), ("prompt-only rows", self.prompt_only_rows),
            (f"rows cut by max_length={self.max_length}", self.truncated_rows), ("prompts cut", self.prompts_cut),
            ("response tokens lost", f"{self.response_tokens_lost} ({self.response_tokens_lost_share:.1%})"),
            ("length p50 / p90 / p95 / p99 / max",
             " / ".join(str(p.get(k)) for k in ("p50", "p90", "p95", "p99", "max"))),
        ]
        if self.val_rows is not None:
            rows += [("validation rows", self.val_rows),
                     ("validation rows duplicating training", self.val_overlap_rows),
                     ("validation prompts seen in training", self.val_prompt_overlap_rows)]
        if self.families:
            rows.append(("rows per family", ", ".join(f"{k} {v}" for k, v in sorted(self.families.items()))))
        out = ["| check | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
        w = self.warnings()
        if w:
            out += [""] + [f"- **warning**: {x}" for x in w]
        if self.notes:
            out += [""] + [f"- note: {x}" for x in self.notes]
        return "\n".join(out) + "\n"


def quality_report(rowset, examples: list[dict], *, max_length: int, val_rows=None) -> DataReport:
    """Count data problems in `rowset` (a RowSet) given its tokenized `examples` (from tokenize_rows).

    Args:
        rowset: the training RowSet (its rows, fmt, path, skipped).
        examples: tokenize_rows(rowset.rows, ...) with the same max_length.
        max_length: the truncation length the examples were made with.
        val_rows: a validation RowSet or list of normalized rows, to count train/validation overlap.
    """
    rows = rowset.rows
    if len(examples) != len(rows):
        raise ValueError(f"examples: {len(examples)} examples for {len(rows)} rows")
    seen_exact, seen_norm = set(), set()
    exact = near = empty = prompt_only = 0
    families: dict[str, int] = {}
    for row in rows:
        text = row_text(row)
        norm = normalize_text(text)
        if text in seen_exact:
            exact += 1
        elif norm in seen_norm:
            near += 1
        seen_exact.add(text)
        seen_norm.add(norm)
        _, responses = row_parts(row)
        if "messages" in row and not responses:
            prompt_only += 1
        elif any(not r.strip() for r in responses):
            empty += 1
        if "family" in row:
            families[row["family"]] = families.get(row["family"], 0) + 1
    kept = sum(sum(lab != -100 for lab in ex["labels"]) for ex in examples)
    lost = sum(ex["n_response_lost"] for ex in examples)
    lengths = sorted(ex.get("length", len(ex["input_ids"])) for ex in examples)
    rep = DataReport(
        path=str(rowset.path), fmt=rowset.fmt, rows=len(rows), skipped_rows=rowset.skipped,
        tokens=sum(len(ex["input_ids"]) for ex in examples), response_tokens=kept,
        exact_duplicates=exact, near_duplicates=near, empty_responses=empty, prompt_only_rows=prompt_only,
        truncated_rows=sum(bool(ex["truncated"]) for ex in examples),
        prompts_cut=sum(bool(ex.get("prompt_cut")) for ex in examples),
        response_tokens_lost=lost, response_tokens_lost_share=lost / (kept + lost) if kept + lost else 0.0,
        max_length=max_length,
        length_percentiles={f"p{q}": _percentile(lengths, q) for q in (50, 90, 95, 99)} | {
            "max": lengths[-1] if lengths else 0},
        families=families, formats=dict(getattr(rowset, "formats", None) or {rowset.fmt: len(rows)}),
    )
    if val_rows is not None:
        vrows = val_rows.rows if hasattr(val_rows, "rows") else list(val_rows)
        train_prompts = {normalize_text(row_parts(r)[0]) for r in rows if row_parts(r)[0]}
        rep.val_rows = len(vrows)
        rep.val_overlap_rows = sum(normalize_text(row_text(r)) in seen_norm for r in vrows)
        rep.val_prompt_overlap_rows = sum(bool(row_parts(r)[0]) and normalize_text(row_parts(r)[0]) in train_prompts
                                          for r in vrows)
    return rep
