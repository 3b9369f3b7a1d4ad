"""Task families of the bundled dataset and their answer checkers.

Each bundled row is a chat (`messages`: one user turn, one assistant turn) with a `family` and the canonical
`answer`. The checkers are strict about the format each prompt asks for and fair about everything else: they strip
surrounding whitespace (and quotes or backticks a model may wrap a one-line answer in) and ignore one trailing
period. So a model scores by answering in the required format, not by being close.

Families (the prompt states the format each time):
- `json_extract`: a sentence about a person -> JSON {"person": {"name", "age"}, "location": {"city"}}.
- `unit_convert`: "Convert 7 m to cm" -> "700 cm" (factors 10, 100 or 1000).
- `sort_numbers`: 3-4 numbers -> the same numbers ascending, comma-separated.
- `arithmetic`: a short word problem with small numbers -> a working line then "Answer: N" as the last line.
- `snake_case`: a camelCase identifier -> snake_case.
- `count_items`: a comma-separated list -> the number of items, digits only.
- `date_format`: an ISO date -> DD/MM/YYYY or "D Month YYYY", as asked.
- `extract_field`: a shipping note -> one asked field's value only.
- `bracket_upper`: a word -> the word in uppercase inside square brackets.

A family without a checker (a user's own test file) is scored by normalised exact match: the reply equals the
reference after `normalize_answer`, whitespace collapsed and case folded. The reference of a row is its "answer",
else its last assistant message (or its completion).
"""

from __future__ import annotations

import json
import re

FAMILY_NAMES = (
    "json_extract", "unit_convert", "sort_numbers", "arithmetic", "snake_case",
    "count_items", "date_format", "extract_field", "bracket_upper",
)


def normalize_answer(text: str) -> str:
    """Strip whitespace, wrapping quotes/backticks and one trailing period from a one-line answer."""
    s = text.strip()
    if s.startswith("```") and s.endswith("```") and len(s) >= 6:
        s = s[3:-3].strip()
        if s.startswith("json\n"):
            s = s[5:].strip()
    for q in ("`", '"', "'"):
        if len(s) >= 2 and s[0] == q and s[-1] == q and q not in s[1:-1]:
            s = s[1:-1].strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    return s


def _check_json(prediction: str, answer: str) -> bool:
    s = prediction.strip()
    if s.startswith("```"):
        s = normalize_answer(s)
    try:
        got = json.loads(s)
    except ValueError:
        return False
    return _same_json(got, json.loads(answer))


def _same_json(got, want) -> bool:
    # Strict on keys, nesting and types ("34" is not 34, True is not 1); fair on whitespace and key order.
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(_same_json(got[k], want[k]) for k in want)
    return type(got) is type(want) and got == want


def _check_arithmetic(prediction: str, answer: str) -> bool:
    lines = [ln.strip() for ln in prediction.strip().splitlines() if ln.strip()]
    if not lines:
        return False
    m = re.fullmatch(r"Answer: (-?\d+)\.?", lines[-1])
    want = re.findall(r"-?\d+", answer)[-1]  # the canonical answer is "a + b = c\nAnswer: c"
    return m is not None and int(m.group(1)) == int(want)


def _check_exact(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == answer


def _check_list(prediction: str, answer: str) -> bool:
    # Fair about spacing after commas, strict about order and separator.
    got = [p.strip() for p in normalize_answer(prediction).split(",")]
    return got == [p.strip() for p in answer.split(",")]


_CHECKERS = {
    "json_extract": _check_json,
    "unit_convert": _check_exact,
    "sort_numbers": _check_list,
    "arithmetic": _check_arithmetic,
    "snake_case": _check_exact,
    "count_items": _check_exact,
    "date_format": _check_exact,
    "extract_field": _check_exact,
    "bracket_upper": _check_exact,
}
assert set(_CHECKERS) == set(FAMILY_NAMES)


EXACT_MATCH = "normalised exact match"


def scoring(family: str) -> str:
    """How `score` scores `family`: "checker: <family>" or "normalised exact match"."""
    return f"checker: {family}" if family in _CHECKERS else EXACT_MATCH


def reference(row: dict) -> str | None:
    """The text a reply to `row` is scored against: "answer", else the last assistant turn or the completion."""
    if row.get("answer") is not None:
        return str(row["answer"])
    if "messages" in row:
        return next((m["content"] for m in reversed(row["messages"]) if m["role"] == "assistant"), None)
    return row.get("completion")


def _check_normalised(prediction: str, answer: str) -> bool:
    norm = lambda s: " ".join(normalize_answer(s).split()).casefold()  # noqa: E731
    return norm(prediction) == norm(answer)


def score(family: str, prediction: str, row: dict) -> bool:
    """Whether `prediction` (the model's reply, text only) answers `row`.

    Args:
        family: one of FAMILY_NAMES (its checker), or any other name (normalised exact match).
        prediction: the generated assistant text.
        row: the dataset row; `reference(row)` is the canonical answer.

    Raises:
        ValueError: when the row has no reference to score against.
    """
    if not isinstance(prediction, str):
        raise TypeError(f"prediction: expected str, got {type(prediction).__name__}")
    ref = reference(row)
    if ref is None:
        raise ValueError(f"row has no 'answer' and no assistant message or completion to score against: keys "
                         f"{sorted(row)}")
    return _CHECKERS.get(family, _check_normalised)(prediction, ref)
