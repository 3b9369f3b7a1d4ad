"""Bad data is a message, never a traceback: every fault of a data file or row is a `DataError` naming the file and
line (or row), skippable where it is a row's fault, and found the same way by `sftfuse data-check` and by
`sftfuse train` (which finds it before loading the model). Text is never altered: bytes that are not UTF-8 are an
error, a UTF-8 byte-order mark and CRLF line ends are read like plain UTF-8 with LF.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftfuse.train import data
from sftfuse.train.config import TrainConfig
from sftfuse.train.run_data import RunData
from tests.train.test_data import CHATML, byte_tokenizer

PC = '{"prompt": "p", "completion": "c"}'
CHAT = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    byte_tokenizer().save_pretrained(d)
    return d


def _jsonl(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


# name: (file name, bytes, words of the error)
BAD_FILES = {
    "latin-1 JSONL": ("d.jsonl", _jsonl(PC) + '{"prompt": "café", "completion": "c"}\n'.encode("latin-1"),
                      "d.jsonl:line 2: not UTF-8 text (byte 0xE9"),
    "latin-1 JSON array": ("d.json", '[\n{"text": "a"},\n{"text": "café"}\n]'.encode("latin-1"),
                           "d.json:line 3: not UTF-8 text"),
    "latin-1 CSV": ("d.csv", "prompt,completion\np,c\ncafé,c\n".encode("latin-1"), "d.csv:line 3: not UTF-8 text"),
    "UTF-16 JSONL": ("d.jsonl", (PC + "\n").encode("utf-16"), "d.jsonl: UTF-16 text (byte-order mark FF FE)"),
    "UTF-16 CSV": ("d.csv", "prompt,completion\np,c\n".encode("utf-16"), "d.csv: UTF-16 text"),
    "UTF-16 without BOM": ("d.jsonl", (PC + "\n").encode("utf-16-le"), "d.jsonl:line 1: NUL bytes"),
    "0-byte Parquet": ("d.parquet", b"", "d.parquet: empty file (0 bytes)"),
    "broken Parquet": ("d.parquet", b"PAR1 not really", "d.parquet: not a readable Parquet file"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_a_data_error_naming_it(tmp_path, case):
    name, raw, words = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(data.DataError) as e:
        data.read_rows(path)
    assert str(e.value).startswith(str(tmp_path)) and words in str(e.value)


def test_latin1_line_is_skipped_and_counted_never_altered(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(_jsonl(PC) + '{"prompt": "café", "completion": "c"}\n'.encode("latin-1") + _jsonl(PC))
    rs = data.read_rows(path, skip_bad_rows=True)
    assert (len(rs), rs.skipped, rs.locs) == (2, 1, ["line 1", "line 3"])
    assert "line 2: not UTF-8" in rs.errors[0]


def test_directories_without_a_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match=r"empty: empty directory"):
        data.read_rows(tmp_path / "empty")
    shards = tmp_path / "shards"
    shards.mkdir()
    for n in ("a.jsonl", "b.jsonl"):
        (shards / n).write_text(PC + "\n")
    # Refused, not concatenated: a folder may hold train.jsonl and validation.jsonl side by side.
    with pytest.raises(data.DataError, match=r"shards: a directory of data files \(a\.jsonl, b\.jsonl\): pass one"):
        data.read_rows(shards)


def test_bom_crlf_and_long_cells_read_correctly(tmp_path):
    ref = data.read_rows(_write(tmp_path / "ref.jsonl", _jsonl(PC, json.dumps({"prompt": "q", "completion": "r",
                                                                               "family": "f"})))).rows
    bom = b"\xef\xbb\xbf"
    crlf = (PC + "\r\n" + json.dumps({"prompt": "q", "completion": "r", "family": "f"}) + "\r\n").encode()
    assert data.read_rows(_write(tmp_path / "bom.jsonl", bom + crlf)).rows == ref
    assert data.read_rows(_write(tmp_path / "bom.json", bom + b"[" + crlf.replace(b"}\r\n{", b"},\r\n{") + b"]"))\
        .rows == ref
    # The first column is `family`: a BOM left in place would rename it and drop every family silently.
    csv_bytes = bom + b"family,prompt,completion\r\n,p,c\r\nf,q,r\r\n"
    assert data.read_rows(_write(tmp_path / "bom.csv", csv_bytes)).rows == ref
    long = "x" * (200 * 1024)  # over the csv module's 128 KiB default cell limit
    rows = data.read_rows(_write(tmp_path / "long.csv", f"prompt,completion\np,{long}\n".encode())).rows
    assert rows == [{"prompt": "p", "completion": long}]


def _write(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path


# ------------------------------------------------------------------------------------- errors while tokenizing

REFUSE_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                 "supported') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
UPPER = CHATML.replace("m['content'] }}", "m['content'] | upper }}")
TOKENIZE_ERRORS = {  # template: (line 2's chat, words of the error)
    "template refuses": (REFUSE_SYSTEM, [{"role": "system", "content": "s"}] + CHAT["messages"],
                         "the chat template refused this conversation (System role not supported)"),
    "assistant not found": (UPPER, [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "u"}],
                            "assistant message 1 not found in the rendered chat template"),
}


@pytest.mark.parametrize("case", list(TOKENIZE_ERRORS))
def test_tokenizing_error_names_file_and_line_and_is_skippable(tmp_path, case):
    template, chat, words = TOKENIZE_ERRORS[case]
    tok = byte_tokenizer(template)
    path = _write(tmp_path / "t.jsonl", _jsonl(json.dumps(CHAT), json.dumps({"messages": chat}), json.dumps(CHAT)))
    with pytest.raises(data.DataError) as e:
        data.tokenize_rowset(data.read_rows(path), tok, max_length=64)
    assert str(e.value).startswith(f"{path}:line 2: ") and words in str(e.value) and "--skip-bad-rows" in str(e.value)
    rs = data.read_rows(path)
    ex = data.tokenize_rowset(rs, tok, max_length=64, skip_bad_rows=True)
    assert (len(ex), len(rs), rs.skipped, rs.locs) == (2, 2, 1, ["line 1", "line 3"])
    assert data.quality_report(rs, ex, max_length=64).skipped_rows == 1


def _cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{"output_dir": str(tmp_path / "out"), "task_eval": False, "max_length": 64, **kw})


BAD_FOR_BOTH = {  # each found by the same check in `data-check` and in `train`
    "latin-1 row": (b'{"prompt": "caf\xe9", "completion": "c"}\n', None),
    "template refuses": (_jsonl(json.dumps({"messages": [{"role": "system", "content": "s"}] + CHAT["messages"]})),
                         REFUSE_SYSTEM),
    "no response token": (_jsonl(json.dumps({"messages": CHAT["messages"][:1]})), None),
}


@pytest.mark.parametrize("case", list(BAD_FOR_BOTH))
def test_data_check_and_train_agree(tmp_path, capsys, case):
    from sftfuse.train.cli import main

    raw, template = BAD_FOR_BOTH[case]
    tok_dir = tmp_path / "tok"
    byte_tokenizer(template or CHATML).save_pretrained(tok_dir)
    path = _write(tmp_path / "bad.jsonl", raw if case == "no response token" else _jsonl(json.dumps(CHAT)) + raw)
    with pytest.raises(data.DataError) as e:
        RunData(_cfg(tmp_path, train_file=str(path), model=str(tok_dir))).check_tokens()
    assert main(["data-check", str(path), "--tokenizer", str(tok_dir), "--max-length", "64"]) == 1
    assert capsys.readouterr().err.strip() == f"error: {e.value}"
    assert str(path) in str(e.value)


def test_no_trainable_token_is_reported_before_the_model_loads(tmp_path, tok_dir, monkeypatch):
    from sftfuse.train import trainer

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(trainer, "load_model_and_tokenizer", no_load)
    path = _write(tmp_path / "prompts.jsonl", _jsonl(*[json.dumps({"messages": CHAT["messages"][:1]})] * 3))
    t = trainer.Trainer(_cfg(tmp_path, train_file=str(path), model=str(tok_dir)), quiet=True)
    try:
        with pytest.raises(data.DataError, match=r"prompts\.jsonl: no training example has a response token"):
            t.setup()
    finally:
        t.cleanup()


def test_validation_file_with_no_response_is_an_error(tmp_path, tok_dir):
    """All validation rows filtered out (prompt-only here) would silently turn validation and early stopping off."""
    train = _write(tmp_path / "train.jsonl", _jsonl(json.dumps(CHAT)))
    val = _write(tmp_path / "val.jsonl", _jsonl(*[json.dumps({"messages": CHAT["messages"][:1]})] * 2))
    rd = RunData(_cfg(tmp_path, train_file=str(train), validation_file=str(val)))
    with pytest.raises(data.DataError, match=r"val\.jsonl: no validation row has a response token"):
        rd.tokenize(byte_tokenizer(), None, print)


def test_datasetdict_as_validation_file_gives_its_validation_split(tmp_path, tok_dir):
    import datasets

    dd = tmp_path / "dd"
    datasets.DatasetDict({s: datasets.Dataset.from_list([{"prompt": f"{s} {i}", "completion": "c"} for i in range(3)])
                          for s in ("train", "validation")}).save_to_disk(str(dd))
    rd = RunData(_cfg(tmp_path, train_file=str(dd), validation_file=str(dd)))
    assert rd.train_set.rows[0]["prompt"] == "train 0" and rd.val_set.rows[0]["prompt"] == "validation 0"


def test_data_check_skips_tokenizing_errors_with_a_message(tmp_path, capsys):
    from sftfuse.train.cli import main

    tok_dir = tmp_path / "tok"
    byte_tokenizer(REFUSE_SYSTEM).save_pretrained(tok_dir)
    bad = {"messages": [{"role": "system", "content": "s"}] + CHAT["messages"]}
    path = _write(tmp_path / "t.jsonl", _jsonl(json.dumps(CHAT), json.dumps(bad), json.dumps(CHAT)))
    assert main(["data-check", str(path), "--tokenizer", str(tok_dir), "--skip-bad-rows"]) == 0
    out = capsys.readouterr().out
    assert f"skipped: {path}:line 2: the chat template refused" in out and "warning: 1 bad rows skipped" in out


def test_data_check_tokenizer_problems_are_messages(tmp_path, capsys):
    from sftfuse.train.cli import main

    path = _write(tmp_path / "c.jsonl", _jsonl(json.dumps(CHAT)))
    no_template = byte_tokenizer()
    no_template.chat_template = None
    no_template.save_pretrained(tmp_path / "plain")
    assert main(["data-check", str(path), "--tokenizer", str(tmp_path / "plain")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {path}: the tokenizer has no chat template")
    assert main(["data-check", str(path), "--tokenizer", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.startswith(f"error: cannot load the tokenizer {tmp_path / 'missing'}")


def test_json_lines_in_a_json_file_get_a_hint(tmp_path):
    path = _write(tmp_path / "d.json", _jsonl(PC, PC))
    with pytest.raises(data.DataError, match=r"d\.json:line 2: invalid JSON \(Extra data\): one record per line is "
                                             r"JSON Lines, name the file \.jsonl"):
        data.read_rows(path)


@pytest.mark.parametrize("content, words", [('["a", "b",]', r"probe\.json:line 1: invalid JSON"),
                                            ('["a", 7]', r"probe\.json: probe prompt 2 \(7\) is neither"),
                                            ("[]", r"probe\.json: no probe prompts")])
def test_bad_probe_file_is_found_before_the_model(tmp_path, content, words):
    train = _write(tmp_path / "train.jsonl", _jsonl(json.dumps(CHAT)))
    probe = _write(tmp_path / "probe.json", content.encode())
    with pytest.raises(data.DataError, match=words):
        RunData(_cfg(tmp_path, train_file=str(train), probe_file=str(probe), probe=True))
