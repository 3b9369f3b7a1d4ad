"""File readers for sftfuse.train.data: each yields (location, record) with the line (or row) a record starts on.

A record that cannot be parsed is yielded as a `DataError` (without location) so that the caller decides whether
to stop or to skip and count it; a fault of the whole file (UTF-16, NUL bytes, a Parquet file that does not parse,
a directory that holds no dataset) raises `DataError` naming the file.

Text is UTF-8 and is never altered: undecodable bytes are an error of their line (JSONL: skippable; JSON and CSV,
whose records can span lines: an error of the file, naming the line). A UTF-8 byte-order mark is dropped and CRLF
line ends are read like LF. A directory is either one saved by `datasets.save_to_disk` or refused: a folder of
JSONL files may hold train and validation splits side by side, and reading them as one would mix them silently.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

FORMATS = ("alpaca", "prompt_completion", "messages", "text")
# Which split of a DatasetDict each role reads, first match wins.
SPLITS = {"train": ("train",), "validation": ("validation", "val", "dev", "test"), "test": ("test",)}
_BOM = b"\xef\xbb\xbf"
_CSV_CELL_LIMIT = 1 << 30  # the csv module stops at 128 KiB a cell; long documents are legitimate data
_DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".pq")


class DataError(ValueError):
    """A bad data file or row; the message names the file and the line (or row) number."""


def records(path: Path, *, split: str = "train"):
    """Yield (location, record) pairs; a record that cannot be parsed is yielded as a DataError.

    Args:
        path: a data file or a `datasets` directory.
        split: "train", "validation" or "test": which split of a DatasetDict directory to read (see SPLITS).

    Raises:
        DataError: naming `path`, when the file as a whole cannot be read.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {tuple(SPLITS)}")
    if path.is_dir():
        yield from _dataset_records(path, split)
        return
    suffix = path.suffix.lower()
    if suffix not in _DATA_SUFFIXES:
        raise DataError(f"{path}: unknown file type {suffix!r} (expected .jsonl, .json, .csv, .parquet or a "
                        f"datasets directory)")
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (0 bytes)")
        if suffix in (".parquet", ".pq"):
            yield from _parquet_records(path)
            return
        with open(path, "rb") as f:
            _check_text_start(path, f.read(4096))
            f.seek(0)
            if suffix in (".jsonl", ".ndjson"):
                yield from _jsonl_records(f)
            elif suffix == ".json":
                yield from _json_array_records(_decode(path, f.read()))
            else:
                yield from _csv_records(path, _decode(path, f.read()), "\t" if suffix == ".tsv" else ",")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _check_text_start(path: Path, head: bytes) -> None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: UTF-16 text (byte-order mark {head[:2].hex(' ').upper()}); sftfuse reads UTF-8: "
                        f"convert it, e.g. `iconv -f UTF-16 -t UTF-8`")
    if b"\0" in head:
        line = head.count(b"\n", 0, head.index(b"\0")) + 1
        raise DataError(f"{path}:line {line}: NUL bytes: UTF-16 text without a byte-order mark or a binary file "
                        f"(expected UTF-8 text)")


def _undecodable(raw: bytes, e: UnicodeDecodeError) -> str:
    """The message for bytes that are not UTF-8, with the column (counted in bytes) where they start."""
    col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    return (f"not UTF-8 text (byte 0x{raw[e.start]:02X} at column {col}; Latin-1 or another legacy encoding? "
            f"convert the file to UTF-8)")


def _decode(path: Path, raw: bytes) -> str:
    """A whole file as text; undecodable bytes raise DataError naming the file and line."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:line {line}: {_undecodable(raw, e)}") from None


def _jsonl_records(f):
    for i, raw in enumerate(f, 1):
        if i == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield f"line {i}", DataError(_undecodable(raw, e))
            continue
        if line.strip():
            try:
                yield f"line {i}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {i}", DataError(f"invalid JSON ({e.msg} at column {e.colno})")


def _csv_records(path: Path, text: str, delimiter: str):
    old = csv.field_size_limit(_CSV_CELL_LIMIT)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        start = 2
        while True:
            try:
                rec = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # an unterminated quote, a cell over the limit: the file cannot be resynced
                raise DataError(f"{path}:line {reader.line_num}: unreadable CSV ({e})") from None
            loc = f"line {start}"
            start = reader.line_num + 1
            if None in rec:
                yield loc, DataError(f"{len(rec[None])} more cells than the header's {len(reader.fieldnames)}")
                continue
            yield loc, {k: _csv_cell(k, v) for k, v in rec.items() if v is not None}
    finally:
        csv.field_size_limit(old)


def _csv_cell(key: str, value: str):
    # A chat in a CSV cell is a JSON array; anything else stays text.
    if key == "messages" and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _parquet_records(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    for i, rec in enumerate(table.to_pylist()):
        yield f"row {i + 1}", rec


def _dataset_records(path: Path, split: str):
    """Rows of a `datasets.save_to_disk` directory; of a DatasetDict, the split that `split` asks for."""
    entries = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    is_dict = (path / "dataset_dict.json").exists()
    if not is_dict and not (path / "dataset_info.json").exists():
        if not entries:
            raise DataError(f"{path}: empty directory (expected a data file or a directory saved by "
                            f"datasets.save_to_disk)")
        files = [n for n in entries if Path(n).suffix.lower() in _DATA_SUFFIXES]
        what = f"data files ({', '.join(files[:5])}{', ...' if len(files) > 5 else ''})" if files else \
            f"no dataset ({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''})"
        raise DataError(f"{path}: a directory of {what}: pass one file (a folder is not read as one data set, "
                        f"since it may hold several splits), or a directory saved by datasets.save_to_disk")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: cannot load the datasets directory ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        name = next((s for s in SPLITS[split] if s in ds), None)
        if name is None and split == "train" and len(ds) == 1:
            name = next(iter(ds))
        if name is None:
            raise DataError(f"{path}: a DatasetDict with splits {sorted(ds)} has no {split} split (looked for "
                            f"{', '.join(SPLITS[split])})")
        ds = ds[name]
    for i, rec in enumerate(ds):
        yield f"row {i + 1}", rec


def _json_array_records(text: str):
    """Records of a JSON array, each with the line it starts on (a whole-file parse would lose them).

    Lines are counted incrementally from one record to the next, so reading is linear in the file's size.
    """
    dec = json.JSONDecoder()
    counted = [0, 1]  # (position, line there): newlines before `position` are counted once

    def line_of(pos):
        counted[1] += text.count("\n", counted[0], pos)
        counted[0] = pos
        return counted[1]

    def skip_ws(pos):
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_ws(0)
    if pos < len(text) and text[pos] == "{":  # {"data": [...]} or a single record
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            hint = ": one record per line is JSON Lines, name the file .jsonl" if e.msg == "Extra data" else ""
            yield f"line {e.lineno}", DataError(f"invalid JSON ({e.msg}){hint}")
            return
        recs = obj.get("data") if isinstance(obj.get("data"), list) else [obj]
        for i, rec in enumerate(recs):
            yield f"record {i + 1}", rec
        return
    if pos >= len(text) or text[pos] != "[":
        yield f"line {line_of(pos)}", DataError("invalid JSON (expected an array of records)")
        return
    pos = skip_ws(pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            rec, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield f"line {e.lineno}", DataError(f"invalid JSON ({e.msg} at column {e.colno})")
            return
        yield f"line {line_of(pos)}", rec
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
        elif pos < len(text) and text[pos] == "]":
            return
        else:
            yield f"line {line_of(pos)}", DataError("invalid JSON (expected ',' or ']' between records)")
            return
