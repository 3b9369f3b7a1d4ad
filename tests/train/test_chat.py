"""`sftfuse chat` (train/chat.py): one-shot and batch answers from an adapter or a merged model, clean errors.

The model is the tiny Llama of conftest.py with a random adapter (tests/train/test_merge.py makes it): its answers
are gibberish, but greedy decoding makes them deterministic, so the streamed one-shot answer, the batch answers and
a plain `generate` of the merged model must agree.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from sftfuse.train import chat
from sftfuse.train.cli import main
from sftfuse.train.merge import merge
from tests.train.test_merge import _make_adapter


@pytest.fixture(scope="module")
def adapter(tiny_dir, tmp_path_factory):
    return _make_adapter(tiny_dir, tmp_path_factory.mktemp("chat") / "adapter", qlora=True)


def _greedy(model, tok, prompt: str, n: int) -> str:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_one_shot_streams_the_greedy_answer(adapter, capsys):
    rc = main(["chat", str(adapter), "--prompt", "How many items? apple, pen", "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    m = merge(adapter, fidelity_rows=0)
    want = _greedy(m.model, m.tok, "How many items? apple, pen", 8)
    assert want and out.strip() == want


def test_batch_file_gives_one_json_answer_per_line(adapter, tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Name a colour."}) + "\n\n" + json.dumps("Say hi.") + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "Count: a, b"}]}) + "\n")
    rc = main(["chat", str(adapter), "--file", str(f), "--max-new-tokens", "6"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 3
    recs = [json.loads(x) for x in lines]
    assert recs[0]["prompt"] == "Name a colour." and recs[1]["prompt"] == "Say hi." and "messages" in recs[2]
    m = merge(adapter, fidelity_rows=0)
    assert recs[0]["answer"] == _greedy(m.model, m.tok, "Name a colour.", 6)


def test_a_merged_model_directory_chats_too(adapter, tmp_path, capsys):
    assert main(["merge", str(adapter), str(tmp_path / "merged"), "--fidelity-rows", "0"]) == 0
    capsys.readouterr()
    assert main(["chat", str(tmp_path / "merged"), "--prompt", "Name a colour.", "--max-new-tokens", "6"]) == 0
    m = merge(adapter, fidelity_rows=0)
    assert capsys.readouterr().out.strip() == _greedy(m.model, m.tok, "Name a colour.", 6)


@pytest.mark.parametrize(("make", "match"), [
    (lambda d: d / "missing", "no such file or directory"),
    (lambda d: d, "not an adapter directory"),
    (lambda d: (d / "x.txt").write_text("hi") and d / "x.txt", "not an adapter directory"),
])
def test_bad_paths_are_one_line_errors(tmp_path, capsys, make, match):
    path = make(tmp_path)
    assert main(["chat", str(path), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


@pytest.mark.parametrize(("text", "match"), [
    ('{"prompt": "ok"}\n{"prompt": 3}\n', r"p\.jsonl:line 2: expected"),
    ('{"prompt": "ok"}\nnot json\n', r"p\.jsonl:line 2: not JSON"),
    ("\n\n", "no prompts"),
])
def test_bad_prompt_files_are_named_before_any_load(adapter, tmp_path, capsys, monkeypatch, text, match):
    f = tmp_path / "p.jsonl"
    f.write_text(text)
    monkeypatch.setattr(chat, "load_chat_model", lambda *a, **k: pytest.fail("loaded the model for a bad file"))
    assert main(["chat", str(adapter), "--file", str(f)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(match, err), err


def test_missing_prompt_file_and_bad_options(adapter, tmp_path, capsys):
    assert main(["chat", str(adapter), "--file", str(tmp_path / "none.jsonl")]) == 1
    assert "none.jsonl: No such file" in capsys.readouterr().err
    assert main(["chat", str(adapter), "--prompt", "x", "--max-new-tokens", "0"]) == 1
    assert "--max-new-tokens 0" in capsys.readouterr().err


def test_interactive_keeps_the_conversation_and_resets(adapter, monkeypatch, capsys):
    said = iter(["Name a colour.", "And another?", "/reset", "Name a colour.", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(said))
    seen = []
    real = chat.answer
    monkeypatch.setattr(chat, "answer", lambda m, t, msgs, **kw: seen.append(list(msgs)) or real(m, t, msgs, **kw))
    assert main(["chat", str(adapter), "--max-new-tokens", "4"]) == 0
    assert [len(m) for m in seen] == [1, 3, 1]  # the second turn carries the first; /reset forgets it
    assert seen[1][1]["role"] == "assistant" and capsys.readouterr().out.count("model> ") == 3
