"""sftfuse.train.data: readers, validation, masking, packing, collate, quality report, bundled dataset.

No download: a byte-level tokenizer is built in code (one token per byte, plus ChatML special tokens), so token
positions equal character positions and label masks can be checked token by token against the rendered text.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sftfuse.train import data
from sftfuse.train.models import tiny_model

CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# A template whose turns do not end with EOS: the response must get EOS appended.
NO_EOS = ("{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}\n{% endfor %}"
          "{% if add_generation_prompt %}[assistant]: {% endif %}")


def byte_tokenizer(template: str = CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core)
    tok.add_special_tokens({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "pad_token": "<|pad|>"})
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


RECORDS = {
    "alpaca": [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
               {"instruction": "Upper-case this.", "input": "abc", "output": "ABC", "family": "f1"}],
    "prompt_completion": [{"prompt": "Q: 1+1?\nA:", "completion": " 2"}, {"prompt": "Q: hi", "completion": " hey"}],
    "messages": [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
                 {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                               {"role": "assistant", "content": "b"}], "family": "x"}],
    "text": [{"text": "Plain text one."}, {"text": "Two, with a comma."}],
}


def write(path: Path, records: list, kind: str) -> Path:
    """Write records as `kind` (jsonl, json, csv, parquet, datasets) and return the path."""
    if kind == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(records, indent=2))
    elif kind == "csv":
        import csv

        path = path.with_suffix(".csv")
        keys = sorted({k for r in records for k in r})
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            for r in records:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = path.with_suffix(".parquet")
        keys = sorted({k for r in records for k in r})  # from_pylist takes the schema from the first record only
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records]), path)
    else:
        import datasets

        keys = sorted({k for r in records for k in r})
        datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in records]).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "datasets"])
@pytest.mark.parametrize("fmt", list(RECORDS))
def test_read_every_file_kind_and_format(tmp_path, kind, fmt):
    path = write(tmp_path / "d", RECORDS[fmt], kind)
    rs = data.read_rows(path)
    assert rs.fmt == fmt and rs.skipped == 0 and len(rs) == 2
    expected = data.read_rows(write(tmp_path / "ref", RECORDS[fmt], "jsonl")).rows
    assert rs.rows == expected  # every reader normalizes to the same rows
    if fmt == "alpaca":
        assert rs.rows[0] == {"prompt": "### Instruction:\nAdd 2 and 3.\n\n### Response:\n", "completion": "5"}
        assert "### Input:\nabc" in rs.rows[1]["prompt"] and rs.rows[1]["family"] == "f1"
    assert data.read_rows(path, fmt=fmt).rows == rs.rows


BAD = {  # kind -> (line 3 of a JSONL file, words the error must contain)
    "invalid JSON": ('{"prompt": "a", "completion": ', "invalid JSON"),
    "missing field": ('{"prompt": "a"}', "missing field 'completion'"),
    "wrong type": ('{"prompt": "a", "completion": 5}', "'completion' must be a string, got int"),
    "not an object": ('["a", "b"]', "must be an object"),
}
BAD_CHAT = {
    "unknown role": ('{"messages": [{"role": "bot", "content": "x"}]}', "unknown role 'bot' in message 1"),
    "missing content": ('{"messages": [{"role": "user"}]}', "missing field 'content'"),
    "messages not a list": ('{"messages": "hi"}', "'messages' must be a non-empty list"),
}


@pytest.mark.parametrize("case", list(BAD) + list(BAD_CHAT))
def test_bad_row_names_file_and_line(tmp_path, case):
    bad, words = BAD.get(case) or BAD_CHAT[case]
    good = ('{"prompt": "p", "completion": "c"}' if case in BAD else
            '{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}')
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{good}\n{bad}\n{good}\n")
    with pytest.raises(data.DataError) as e:
        data.read_rows(path)
    assert f"{path}:line 3: " in str(e.value) and words in str(e.value)
    rs = data.read_rows(path, skip_bad_rows=True)
    assert len(rs) == 3 and rs.skipped == 1 and "line 3" in rs.errors[0]


def test_bad_rows_in_json_array_and_csv_have_line_numbers(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n  {"text": "a"},\n  {"text": 7}\n]\n')
    with pytest.raises(data.DataError, match=r"a\.json:line 3: field 'text' must be a string"):
        data.read_rows(p)
    p.write_text('[\n  {"text": "a"},\n  {"text": "b",,}\n]\n')
    with pytest.raises(data.DataError, match=r"a\.json:line 3: invalid JSON"):
        data.read_rows(p)
    c = tmp_path / "a.csv"
    c.write_text('prompt,completion\n"multi\nline",x\np,q,extra\n')
    with pytest.raises(data.DataError, match=r"a\.csv:line 4: 1 more cells"):
        data.read_rows(c)
    with pytest.raises(data.DataError, match="no valid rows"):
        data.read_rows(c, skip_bad_rows=True, fmt="text")


def _labeled_text(tok, ex) -> str:
    return "".join(tok.decode([i]) if lab != -100 else "_" for i, lab in zip(ex["input_ids"], ex["labels"]))


def _trained(tok, ex) -> str:
    return tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])


def test_masking_chat_exact_per_token(tok):
    msgs = [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A one"}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"}]
    (ex,) = data.tokenize_rows([{"messages": msgs}], tok, max_length=512, fmt="messages")
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ex["input_ids"]) == full
    # Expected mask from the literal rendering: only each assistant content and its <|im_end|> are labeled.
    expected = ""
    for m in msgs:
        head = "_" * (1 + len(m["role"]) + 1)  # <|im_start|> is one token, then role and "\n" one byte each
        body = m["content"] + "<|im_end|>" if m["role"] == "assistant" else "_" * (len(m["content"]) + 1)
        expected += head + body + "_"
    assert _labeled_text(tok, ex) == expected
    assert ex["labels"][-2] == tok.eos_token_id and ex["labels"][-1] == -100  # the template's "\n" is not trained


def test_masking_default_system_prompt_and_template_without_eos():
    tok = byte_tokenizer(NO_EOS)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    (ex,) = data.tokenize_rows([{"messages": msgs}], tok, max_length=512, fmt="messages")
    # Without an end-of-turn token the template's own turn ending ("\n") is trained, then the appended EOS.
    assert _labeled_text(tok, ex) == "_" * len("[user]: hi\n[assistant]: ") + "yo\n<|im_end|>"
    assert ex["input_ids"][-1] == tok.eos_token_id  # EOS appended after the template's text
    tok = byte_tokenizer()  # CHATML inserts a default system turn: still only the assistant turn is labeled
    (ex,) = data.tokenize_rows([{"messages": msgs}], tok, max_length=512, fmt="messages")
    assert _trained(tok, ex) == "yo<|im_end|>"


def test_masking_prompt_completion_alpaca_text(tok):
    (pc,) = data.tokenize_rows([data.normalize_record(RECORDS["prompt_completion"][0], "prompt_completion")], tok,
                               max_length=512, fmt="prompt_completion")
    (tx,) = data.tokenize_rows([data.normalize_record(RECORDS["text"][0], "text")], tok, max_length=512, fmt="text")
    n = len("Q: 1+1?\nA:")
    assert pc["labels"][:n] == [-100] * n and pc["labels"][n:] == pc["input_ids"][n:]
    assert tok.decode(pc["input_ids"][n:]) == " 2<|im_end|>"
    assert tx["labels"] == tx["input_ids"] and tx["input_ids"][-1] == tok.eos_token_id
    al = data.tokenize_rows([data.normalize_record(RECORDS["alpaca"][0], "alpaca")], tok, max_length=512,
                            fmt="alpaca")[0]
    assert _trained(tok, al) == "5<|im_end|>"


def test_truncation_counts_lost_response_tokens(tok):
    row = {"prompt": "p" * 10, "completion": "c" * 10}  # 10 prompt + 11 response tokens (EOS)
    (ex,) = data.tokenize_rows([row], tok, max_length=15, fmt="prompt_completion")
    assert ex["truncated"] and ex["n_response_lost"] == 6 and not ex["prompt_cut"] and len(ex["input_ids"]) == 15
    (ex,) = data.tokenize_rows([row], tok, max_length=8, fmt="prompt_completion")
    assert ex["prompt_cut"] and ex["n_response_lost"] == 11 and ex["length"] == 21


def _examples(lengths, *, seed=0, vocab=259):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        n_prompt = n // 3
        out.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    return out


def test_pack_best_fit_decreasing():
    # Sizes chosen so best fit needs exactly 3 rows of 10 (7+3, 6+4, 5+5) where first-fit in input order needs 4.
    ex = _examples([5, 3, 6, 4, 5, 7])
    rows = data.pack(ex, max_length=10)
    assert len(rows) == 3 and all(len(r["input_ids"]) == 10 for r in rows)
    docs = sorted(tuple(r["input_ids"][i] for i in range(len(r["doc_ids"])) if r["position_ids"][i] == 0)
                  for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == 30 and len(sum(docs, ())) == 6
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        assert all(r["labels"][s] == -100 for s in starts)  # no label across a document boundary
        assert r["doc_ids"] == sorted(r["doc_ids"])
    assert data.pack(ex, max_length=10) == rows  # deterministic
    with pytest.raises(ValueError, match="max_length=4"):
        data.pack(ex, max_length=4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_batch_gives_each_document_its_own_loss(attn):
    """Each document's summed token loss in a packed batch equals its loss run alone (and differs without the
    document mask, so the test can fail). Lengths are odd and uneven so rows hold 1-3 documents plus padding."""
    model = tiny_model("llama", dtype=torch.float64)
    model.config._attn_implementation = attn
    ex = _examples([37, 12, 25, 9, 30, 17, 5])
    rows = data.pack(ex, max_length=48)
    batch = data.collate(rows, pad_id=0, packed=True, mask_dtype=torch.float64)
    assert batch["attention_mask"].shape == (len(rows), 1, 48, 48) or batch["input_ids"].shape[1] < 48

    def token_losses(input_ids, labels, **kw):
        logits = model(input_ids=input_ids, **kw).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none",
                                                 ignore_index=-100)  # (B, T-1)

    with torch.no_grad():
        packed = token_losses(batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"])
        unmasked = token_losses(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
        alone = [token_losses(torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])).sum().item() for e in ex]
    doc = torch.tensor([r["doc_ids"] + [-1] * (batch["input_ids"].shape[1] - len(r["doc_ids"])) for r in rows])
    got, leak = [], []
    for b, r in enumerate(rows):
        for d in sorted(set(r["doc_ids"])):
            sel = doc[b, 1:] == d
            got.append(packed[b][sel].sum().item())
            leak.append(unmasked[b][sel].sum().item())
    assert sorted(got) == pytest.approx(sorted(alone), rel=1e-9, abs=1e-9)
    assert sorted(leak) != pytest.approx(sorted(alone), rel=1e-3)


def test_collate_unpacked_pads_right(tok):
    ex = _examples([5, 3])
    b = data.collate(ex, pad_id=7, packed=False)
    assert b["input_ids"][1, 3:].tolist() == [7, 7] and b["labels"][1, 3:].tolist() == [-100, -100]
    assert b["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4]
    m = data.document_mask(torch.tensor([[0, 0, 1, -1]]))
    allowed = (m[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_quality_report_counts_on_crafted_file(tmp_path, tok):
    chat = lambda u, a: {"messages": [{"role": "user", "content": u}] + ([{"role": "assistant", "content": a}]
                                                                          if a is not None else [])}
    records = [
        chat("What is 2+2?", "4"),
        chat("What is 2+2?", "4"),           # exact duplicate 1
        chat("what is 2 + 2", "4."),         # near duplicate (case, punctuation, spacing)
        chat("What is 2+2?", "4"),           # exact duplicate 2
        chat("Say nothing", "   "),          # whitespace response
        chat("Only a prompt", None),         # prompt-only
        chat("Long " * 4, "r" * 40),         # response cut by max_length
        chat("x" * 80, "short"),             # prompt cut by max_length
        chat("Fine", "ok"),
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n")
    rs = data.read_rows(path, skip_bad_rows=True)
    ex = data.tokenize_rows(rs.rows, tok, max_length=64, fmt=rs.fmt)
    val = [chat("WHAT is 2+2", "4"), chat("Fine", "different"), chat("new", "row")]
    rep = data.quality_report(rs, ex, max_length=64, val_rows=val)
    lost = ex[6]["n_response_lost"] + ex[7]["n_response_lost"]
    assert lost > 0 and ex[7]["n_response_lost"] == 6  # "short" + EOS, all beyond the cut
    d = rep.to_dict()
    assert d["rows"] == 9 and d["skipped_rows"] == 1
    assert (d["exact_duplicates"], d["near_duplicates"]) == (2, 1)
    assert (d["empty_responses"], d["prompt_only_rows"]) == (1, 1)
    assert (d["truncated_rows"], d["prompts_cut"], d["response_tokens_lost"]) == (2, 1, lost)
    kept = sum(sum(lab != -100 for lab in e["labels"]) for e in ex)
    assert d["response_tokens_lost_share"] == pytest.approx(lost / (lost + kept))
    assert d["tokens"] == sum(len(e["input_ids"]) for e in ex)
    assert d["length_percentiles"]["max"] == max(e["length"] for e in ex) > 64
    assert (d["val_rows"], d["val_overlap_rows"], d["val_prompt_overlap_rows"]) == (3, 1, 2)
    md = rep.to_markdown()
    assert "| exact duplicates | 2 |" in md and "warning" in md
    assert any("1 prompt-only" in line for line in rep.summary_lines())


def test_generator_is_deterministic_and_matches_bundled(tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "make_dataset.py"
    for out in ("a", "b"):
        subprocess.run([sys.executable, str(script), "--out", str(tmp_path / out)], check=True, capture_output=True)
    for split in ("train", "validation", "test"):
        a = (tmp_path / "a" / f"{split}.jsonl").read_bytes()
        assert a == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
        assert a == data.bundled_path(split).read_bytes(), f"bundled {split} is stale: rerun scripts/make_dataset.py"


def test_bundled_dataset_shape():
    from sftfuse.train import tasks

    splits = {s: data.read_rows(data.bundled_path(s)) for s in ("train", "validation", "test")}
    assert all(rs.fmt == "messages" and rs.skipped == 0 for rs in splits.values())
    assert sum(len(rs) for rs in splits.values()) >= 600
    prompts = {s: {r["messages"][0]["content"] for r in rs.rows} for s, rs in splits.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["validation"]
    for fam in tasks.FAMILY_NAMES:
        assert sum(r["family"] == fam for r in splits["test"].rows) >= 8
    assert len(tasks.FAMILY_NAMES) >= 8
    probes = json.loads(data.bundled_path("probe_prompts").read_text())
    assert len(probes) >= 20 and all(isinstance(p, str) and p for p in probes)


def test_data_check_cli(tmp_path, capsys):
    from sftfuse.train.cli import main

    byte_tokenizer().save_pretrained(tmp_path / "tok")
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"}\n{"prompt": 1}\n')
    assert main(["data-check", str(path), "--tokenizer", str(tmp_path / "tok")]) == 1
    assert f"{path}:line 3: " in capsys.readouterr().err
    assert main(["data-check", str(path), "--tokenizer", str(tmp_path / "tok"), "--skip-bad-rows",
                 "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    assert "| exact duplicates | 1 |" in out and "warning: 1 bad rows skipped" in out


def test_chat_opening_with_assistant_turn(tok):
    msgs = [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "hi"}]
    (ex,) = data.tokenize_rows([{"messages": msgs}], tok, max_length=512, fmt="messages")
    assert _trained(tok, ex) == "Hello<|im_end|>"


# ------------------------------------------------------------------------------------------- issue 16, item 8

def test_format_decided_per_row(tmp_path, tok):
    """One stray `text` row first: with --skip-bad-rows the chat rows after it are kept, not skipped as rows
    "missing field 'text'", and the report says the file mixes formats."""
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"text": "a stray note"}) + "\n" + "".join(
        json.dumps(r) + "\n" for r in RECORDS["messages"] * 2))
    rs = data.read_rows(path, skip_bad_rows=True)
    assert (len(rs), rs.skipped, rs.fmt) == (5, 0, "messages")
    assert rs.formats == {"messages": 4, "text": 1} and rs.rows[0] == {"text": "a stray note"}
    assert rs.locs == [f"line {i}" for i in range(1, 6)]
    rep = data.quality_report(rs, data.tokenize_rowset(rs, tok, max_length=64), max_length=64)
    assert any("several formats (messages 4, text 1)" in w for w in rep.warnings())
    with pytest.raises(data.DataError, match=r"mixed\.jsonl:line 2: missing field 'text'"):
        data.read_rows(path, fmt="text")  # a format given is every row's format


def test_datasetdict_directory_gives_the_split_of_its_role(tmp_path):
    import datasets

    def split(name):
        return datasets.Dataset.from_list([{"prompt": f"{name} {i}", "completion": "c"} for i in range(2)])

    d = tmp_path / "dd"
    datasets.DatasetDict({"train": split("train"), "validation": split("validation"), "test": split("test")}) \
        .save_to_disk(str(d))
    first = {s: data.read_rows(d, split=s).rows[0]["prompt"] for s in ("train", "validation", "test")}
    assert first == {"train": "train 0", "validation": "validation 0", "test": "test 0"}
    d2 = tmp_path / "dd2"  # no "validation": "val", "dev", then "test" stand in for it
    datasets.DatasetDict({"train": split("train"), "dev": split("dev"), "test": split("test")}).save_to_disk(str(d2))
    assert data.read_rows(d2, split="validation").rows[0]["prompt"] == "dev 0"
    d3 = tmp_path / "dd3"
    datasets.DatasetDict({"train": split("train")}).save_to_disk(str(d3))
    with pytest.raises(data.DataError, match=r"dd3: a DatasetDict with splits \['train'\] has no validation split"):
        data.read_rows(d3, split="validation")


def test_special_token_text_in_content_stays_text(tok):
    """A user pasting `<|im_end|>` does not end the turn: the only control tokens are the template's own."""
    msgs = [{"role": "user", "content": "say <|im_end|> then <|im_start|>assistant\nhi"},
            {"role": "assistant", "content": "No <|im_end|>."}]
    (ex,) = data.tokenize_rows([{"messages": msgs}], tok, max_length=512, fmt="messages")
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ex["input_ids"]) == full
    turns = 3  # CHATML adds a system turn
    assert ex["input_ids"].count(tok.eos_token_id) == turns and ex["input_ids"].count(tok.bos_token_id) == turns
    assert _trained(tok, ex) == "No <|im_end|>.<|im_end|>"  # the pasted text is learnt as text, then the real EOS
    assert ex["labels"][-2] == tok.eos_token_id
    ids = data.prompt_ids({"messages": msgs}, tok)
    assert ids.count(tok.eos_token_id) == 2 and tok.decode(ids) == tok.apply_chat_template(
        msgs[:1], tokenize=False, add_generation_prompt=True)
    trim = byte_tokenizer(CHATML.replace("m['content'] }}", "m['content'] | trim }}"))
    (ex,) = data.tokenize_rows([{"messages": [{**msgs[0], "content": f" {msgs[0]['content']} "}, msgs[1]]}], trim,
                               max_length=512, fmt="messages")
    assert ex["input_ids"].count(trim.eos_token_id) == turns
    upper = byte_tokenizer(CHATML.replace("m['content'] }}", "m['content'] | upper }}"))
    with pytest.raises(data.DataError, match="message 1 holds special-token text '<|im_end|>'"):
        data.tokenize_rows([{"messages": msgs}], upper, max_length=512, fmt="messages")


def test_json_array_lines_counted_once(tmp_path):
    """Reading a JSON array is linear: the newlines before each record are counted once, not from the file start
    per record (20k records took 37 s). Counted through str.count, with no clock."""
    from sftfuse.train import data_io

    class Counted(str):
        scanned = 0

        def count(self, sub, start=0, end=None):
            end = len(self) if end is None else end
            Counted.scanned += max(0, end - start)
            return str.count(self, sub, start, end)

    text = json.dumps([{"text": f"row {i}"} for i in range(2000)], indent=1)
    got = list(data_io._json_array_records(Counted(text)))
    assert len(got) == 2000 and got[-1][0] == f"line {text.count(chr(10)) - 2}"
    assert Counted.scanned <= len(text)
