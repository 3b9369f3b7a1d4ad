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
    with pytest.raises(TypeError, match="prediction"):
        tasks.score("count_items", 3, {"answer": "3"})
    with pytest.raises(ValueError, match="no 'answer' and no assistant message"):
        tasks.score("count_items", "3", {"messages": [{"role": "user", "content": "How many?"}]})
    assert json.loads(CASES["json_extract"][0])  # the canonical JSON answer is itself valid JSON


def test_family_without_checker_is_scored_by_normalised_exact_match():
    chat = {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]}
    assert tasks.score("capitals", "  paris.\n", chat)  # no answer: the last assistant message is the reference
    assert tasks.score("capitals", "The  CAPITAL is\nParis", {"answer": "the capital is paris"})
    assert not tasks.score("capitals", "Lyon", chat) and not tasks.score("capitals", "Paris, France", chat)
    assert tasks.score("all", "4", {"prompt": "2+2=", "completion": "4"})  # rows without a family
    assert tasks.scoring("capitals") == tasks.EXACT_MATCH and tasks.scoring("count_items") == "checker: count_items"
    # A bundled family keeps its strict checker, and takes its reference from the chat when there is no answer.
    assert not tasks.score("extract_field", "dhl", {"answer": "DHL"})
    assert tasks.score("count_items", "3", {"messages": chat["messages"][:1] + [{"role": "assistant",
                                                                                   "content": "3"}]})


def test_task_eval_prompts_as_trained_and_scoring_note(monkeypatch):
    """Each row is generated from the tokens training gave its prompt: a prompt/completion (or Alpaca) row's raw
    prompt, not the prompt wrapped in the chat template; a chat through the template. Families without a checker
    are scored by exact match, and the result says so."""
    from tests.train.test_data import byte_tokenizer

    tok = byte_tokenizer()
    alpaca = data.normalize_record({"instruction": "Name a fruit.", "output": "Apple", "family": "fruit"}, "alpaca")
    rows = [{"prompt": "Q: 2+2?\nA:", "completion": " 4", "family": "sums"}, alpaca,
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "3"}],
             "family": "count_items", "answer": "3"}]
    seen = []

    def fake_generate(model, tok_, prompts, **kw):
        seen.extend(p if not isinstance(p, str) else tok_(p, add_special_tokens=False)["input_ids"] for p in prompts)
        return ["4", "apple", "3"]

    monkeypatch.setattr(evaluation, "generate", fake_generate)
    res = evaluation.task_eval(None, tok, rows, max_new_tokens=4, batch_size=2)
    for row, ids in zip(rows, seen, strict=True):
        (ex,) = data.tokenize_rows([row], tok, max_length=512, fmt="messages")
        n_prompt = next(i for i, lab in enumerate(ex["labels"]) if lab != -100)
        assert ids == ex["input_ids"][:n_prompt]
    assert tok.decode(seen[0]) == rows[0]["prompt"]
    assert tok.decode(seen[2]) == tok.apply_chat_template(rows[2]["messages"][:1], tokenize=False,
                                                          add_generation_prompt=True)
    fams = res["families"]
    assert fams["sums"] == {"correct": 1, "total": 1, "acc": 1.0, "scoring": tasks.EXACT_MATCH}
    assert fams["fruit"]["scoring"] == tasks.EXACT_MATCH and fams["fruit"]["acc"] == 1.0
    assert fams["count_items"]["scoring"] == "checker: count_items" and res["mean_acc"] == 1.0


def test_run_data_reports_exact_match_families(tmp_path):
    from sftfuse.train.config import TrainConfig
    from sftfuse.train.run_data import RunData
    from tests.train.test_data import byte_tokenizer

    chat = {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({**chat, "family": "capitals"}) + "\n" + json.dumps({**chat, "family": "count_items",
                                                                                   "answer": "1"}) + "\n")
    bad = tmp_path / "bad_test.jsonl"
    bad.write_text(json.dumps(chat) + "\n" + json.dumps({"text": "no prompt here"}) + "\n")
    cfg = TrainConfig(train_file=str(path), test_file=str(path), output_dir=str(tmp_path / "o"), max_length=64)
    rd = RunData(cfg)
    rd.check_tokens(byte_tokenizer())
    assert any("normalised exact match (no task checker): capitals" in n for n in rd.report().notes)
    assert "note: test families scored by normalised exact match" in rd.report().to_markdown().replace("- ", "")
    with pytest.raises(data.DataError, match=r"bad_test\.jsonl:line 2: test row: a text row has no prompt"):
        RunData(TrainConfig(train_file=str(path), test_file=str(bad), output_dir=str(tmp_path / "o")))
