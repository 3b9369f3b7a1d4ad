"""sftfuse.train.tasks: each family's checker accepts the right answer (and fair variants) and rejects wrong ones.

The rejected cases are what the base model actually writes (chatter, a different format, a wrong value), so a
checker that accepted them would make the before/after comparison meaningless.
"""

from __future__ import annotations

import json

import pytest

from sftfuse.train import data, evaluation, tasks

CASES = {  # family: (answer, accepted predictions, rejected predictions)
    "json_extract": (
        '{"person": {"name": "Lucas", "age": 85}, "location": {"city": "Paris"}}',
        ['{"person": {"name": "Lucas", "age": 85}, "location": {"city": "Paris"}}',
         '{\n  "location": {"city": "Paris"},\n  "person": {"age": 85, "name": "Lucas"}\n}',
         '```json\n{"person": {"name": "Lucas", "age": 85}, "location": {"city": "Paris"}}\n```'],
        ['{"person": {"name": "Lucas", "age": "85"}, "location": {"city": "Paris"}}',  # age as a string
         '{"name": "Lucas", "age": 85, "city": "Paris"}',  # flat: wrong schema
         '{"person": {"name": "Lucas", "age": 85}, "location": {"city": "Paris"}, "extra": 1}',
         '{"person": {"name": "Lucas", "age": 85}, "location": {"city": "Paris"}',  # truncated JSON
         'Here is the JSON: {"person": {"name": "Lucas", "age": 85}, "location": {"city": "Paris"}}'],
    ),
    "unit_convert": ("700 cm", ["700 cm", " 700 cm.\n", "`700 cm`"],
                     ["700", "700cm", "7 m is 700 cm", "7000 cm", "700 centimeters"]),
    "sort_numbers": ("3, 7, 19, 42", ["3, 7, 19, 42", "3,7,19,42", "3, 7, 19, 42."],
                     ["42, 19, 7, 3", "3 7 19 42", "The sorted list is 3, 7, 19, 42", "3, 7, 19"]),
    "arithmetic": ("5 + 3 = 8\nAnswer: 8", ["5 + 3 = 8\nAnswer: 8", "Answer: 8", "5+3 is 8.\nAnswer: 8.\n"],
                   ["5 + 3 = 8", "Answer: 9", "The answer is 8.", "Answer: 8\nThat is all.", "answer: 8"]),
    "snake_case": ("parse_http_header", ["parse_http_header", "`parse_http_header`"],
                   ["parseHttpHeader", "parse_HTTP_header", "The snake_case name is parse_http_header"]),
    "count_items": ("3", ["3", "3.", " 3\n"], ["three", "There are 3 items", "4", "3 items"]),
    "date_format": ("14/07/2023", ["14/07/2023", "14/07/2023."], ["2023-07-14", "14/7/2023", "07/14/2023"]),
    "extract_field": ("DHL", ["DHL", "DHL.", '"DHL"'], ["The carrier is DHL.", "dhl", "UPS"]),
    "bracket_upper": ("[GARDEN]", ["[GARDEN]", " [GARDEN] "], ["GARDEN", "[garden]", "[Garden]", "Sure! [GARDEN]"]),
}


def test_every_family_has_cases():
    assert set(CASES) == set(tasks.FAMILY_NAMES)


@pytest.mark.parametrize("family", tasks.FAMILY_NAMES)
def test_checker_accepts_right_and_rejects_wrong(family):
    answer, good, bad = CASES[family]
    row = {"answer": answer}
    for pred in good:
        assert tasks.score(family, pred, row), f"{family}: rejected a right answer {pred!r}"
    for pred in bad:
        assert not tasks.score(family, pred, row), f"{family}: accepted a wrong answer {pred!r}"


def test_bundled_answers_score_and_prompts_are_built():
    rows = data.read_rows(data.bundled_path("test")).rows
    for row in rows:
        assert tasks.score(row["family"], row["messages"][-1]["content"], row)
        msgs = evaluation.prompt_messages(row)
        assert [m["role"] for m in msgs] == ["user"] and msgs[0]["content"] == row["messages"][0]["content"]
    # The families differ: no answer of one family passes another family's checker on the same row
    by_family = {r["family"]: r for r in rows}
    for fam, row in by_family.items():
        others = [r["answer"] for f, r in by_family.items() if f != fam]
        assert not any(tasks.score(fam, a, row) for a in others)


def test_score_bad_input():
    with pytest.raises(ValueError, match="family='nope'"):
        tasks.score("nope", "x", {"answer": "x"})
    with pytest.raises(TypeError, match="prediction"):
        tasks.score("count_items", 3, {"answer": "3"})
    assert json.loads(CASES["json_extract"][0])  # the canonical JSON answer is itself valid JSON
