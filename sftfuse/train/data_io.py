"""File readers for sftfuse.train.data: each yields (location, record) with the line (or row) a record starts on.

A record that cannot be parsed is yielded as a `DataError` (without location) so that the caller decides whether
to stop or to skip and count it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path


class DataError(ValueError):
    """A bad data file or row; the message names the file and the line (or row) number."""


def records(path: Path):
    """Yield (location, record) pairs; a record that cannot be parsed is yielded as a DataError."""
    suffix = path.suffix.lower()
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        for i, rec in enumerate(ds):
            yield f"row {i + 1}", rec
    elif suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"line {i}", json.loads(line.rstrip("\r\n"))
                    except json.JSONDecodeError as e:
                        yield f"line {i}", DataError(f"invalid JSON ({e.msg} at column {e.colno})")
    elif suffix == ".json":
        yield from _json_array_records(path.read_text(encoding="utf-8"))
    elif suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            start = 2
            for rec in reader:
                loc = f"line {start}"
                start = reader.line_num + 1
                if None in rec:
                    yield loc, DataError(f"{len(rec[None])} more cells than the header's {len(reader.fieldnames)}")
                    continue
                yield loc, {k: _csv_cell(k, v) for k, v in rec.items() if v is not None}
    elif suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist()):
            yield f"row {i + 1}", rec
    else:
        raise DataError(f"{path}: unknown file type {suffix!r} (expected .jsonl, .json, .csv, .parquet or a "
                        f"datasets directory)")


def _csv_cell(key: str, value: str):
    # A chat in a CSV cell is a JSON array; anything else stays text.
    if key == "messages" and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _json_array_records(text: str):
    """Records of a JSON array, each with the line it starts on (a whole-file parse would lose them)."""
    dec = json.JSONDecoder()

    def line_of(pos):
        return text.count("\n", 0, pos) + 1

    def skip_ws(pos):
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_ws(0)
    if pos < len(text) and text[pos] == "{":  # {"data": [...]} or a single record
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield f"line {e.lineno}", DataError(f"invalid JSON ({e.msg})")
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
