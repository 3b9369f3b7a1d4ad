"""Benchmark harness for `pytest bench`: machine facts, peak memory, and result tables beside pytest-benchmark.

Timing: `benchmark.pedantic(fn, rounds=..., warmup_rounds=...)`, synchronising inside `fn` on CUDA. Every op is
timed against its baselines in the same run, on the same inputs; only ratios from one run are compared.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` beyond what was allocated before. On CPU, the peak RSS
beyond the RSS before the call: glibc is told to return every block of 64 KiB or more to the OS on free
(`mallopt(M_MMAP_THRESHOLD)`), the kernel's high-water mark is reset (`/proc/self/clear_refs`), and VmHWM read
after. That mode slows allocation, so memory is measured in separate calls, after the timed rounds.

Each test adds rows with `bench_record(table, row)`; at the end every table is written to
`bench/results/<table>.json` (rows + machine + versions) and `bench/results/<table>.md`.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import time
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).parent / "results"
_TABLES: dict[str, list[dict]] = {}
_M_MMAP_THRESHOLD = -3


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    else:
        cpu = platform.processor()
        try:
            cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        info["device"] = f"CPU: {cpu}, {os.cpu_count()} cores"
    for name in ("triton", "transformers", "peft", "bitsandbytes", "trl"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing or broken optional package is reported as absent
            info[name] = None
    return info


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_memory(fn, device: torch.device | str = "cpu") -> int:
    """Bytes of peak memory that `fn()` needs beyond what was held before the call."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    try:
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS:")
        fn()
        return max(0, _status("VmHWM:") - base)
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def bench_record():
    def record(table: str, row: dict) -> None:
        _TABLES.setdefault(table, []).append(row)

    return record


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def pytest_sessionfinish(session, exitstatus):
    if not _TABLES:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine()
    for table, rows in _TABLES.items():
        (RESULTS / f"{table}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
        cols = list(dict.fromkeys(k for r in rows for k in r))
        lines = [f"# {table}", "", f"Machine: {info['device']}; torch {info['torch']}, triton {info['triton']}, "
                 f"transformers {info['transformers']}, peft {info['peft']}, bitsandbytes {info['bitsandbytes']}; "
                 f"{info['time']}.", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
        (RESULTS / f"{table}.md").write_text("\n".join(lines) + "\n")
