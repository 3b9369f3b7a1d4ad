"""Benchmark harness for `pytest bench`: machine facts, peak memory, and result tables beside pytest-benchmark.

Timing: `benchmark.pedantic(fn, rounds=..., warmup_rounds=...)`, synchronising inside `fn` on CUDA. Every op is
timed against its baselines in the same run, on the same inputs; only ratios from one run are compared.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` beyond what was allocated before. On CPU, the peak RSS
beyond the RSS before the call: glibc is told to return every block of 64 KiB or more to the OS on free
(`mallopt(M_MMAP_THRESHOLD)`), the kernel's high-water mark is reset (`/proc/self/clear_refs`), and VmHWM read
after. That mode slows allocation, so memory is measured in separate calls, after the timed rounds.

Each test adds rows with `bench_record(table, row)`; at the end every table is written to
`bench/results/<table>.json` (rows + machine + versions) and `bench/results/<table>.md`.

FLOP floor: `host_gemm_rate()` measures this host's bf16 and fp32 GEMM rates once per run, on SmolLM2's MLP shape
(1024 x 576) @ (576 x 1536), best of 7 alternating runs each; `x_floor(seconds, flops)` is a time's multiple of
flops / the faster rate, the time the op's FLOPs would take at the host's best GEMM speed. Every table says the
CPU kind (`sftfuse.kernels._cpu.cpu_kind`: AMX-BF16, or AVX512-BF16 without AMX, which an AMX host emulates under
`ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`) and the rates its floors used.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
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


_RATE: dict[str, float | str] = {}
_RATE_SHAPE = (1024, 576, 1536)


def host_gemm_rate() -> dict[str, float | str]:
    """{"bf16 GFLOP/s", "fp32 GFLOP/s", "best GFLOP/s", "cpu kind"} of this host, measured once per run (with
    torch's current thread count)."""
    if not _RATE:
        from sftfuse.kernels._cpu import _best_pair, cpu_kind

        m, k, n = _RATE_SHAPE
        gen = torch.Generator().manual_seed(0)
        a32, b32 = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
        a16, b16 = a32.bfloat16(), b32.bfloat16()
        with torch.no_grad():
            t16, t32 = _best_pair(lambda: torch.mm(a16, b16.t()), lambda: torch.mm(a32, b32.t()))
        flop = 2 * m * k * n
        _RATE.update({"bf16 GFLOP/s": flop / t16 / 1e9, "fp32 GFLOP/s": flop / t32 / 1e9, "cpu kind": cpu_kind()})
        _RATE["best GFLOP/s"] = max(_RATE["bf16 GFLOP/s"], _RATE["fp32 GFLOP/s"])
    return dict(_RATE)


def x_floor(seconds: float, flops: float) -> float:
    """`seconds` as a multiple of the op's FLOP floor: flops at this host's best measured GEMM rate."""
    return seconds / (flops / (host_gemm_rate()["best GFLOP/s"] * 1e9))


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def run_fresh(script: str, args: list[str], timeout: int) -> dict:
    """`python script *args` in a fresh process (repository root as cwd and on PYTHONPATH); the last JSON line it
    prints, or {"error": why} when it timed out, failed or printed none."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        proc = subprocess.run([sys.executable, script, *args], cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[-300:]}
    return json.loads(lines[-1])


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
    info.update(host_gemm_rate())
    for table, rows in _TABLES.items():
        (RESULTS / f"{table}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
        cols = list(dict.fromkeys(k for r in rows for k in r))
        lines = [f"# {table}", "", f"Machine: {info['device']}; torch {info['torch']}, triton {info['triton']}, "
                 f"transformers {info['transformers']}, peft {info['peft']}, bitsandbytes {info['bitsandbytes']}; "
                 f"{info['time']}.", "", f"CPU kind: {info['cpu kind']}; {info['threads']} threads; GEMM rates "
                 f"measured in this run: bf16 {info['bf16 GFLOP/s']:,.0f}, fp32 {info['fp32 GFLOP/s']:,.0f} GFLOP/s "
                 f"(x floor: time / (FLOPs / {info['best GFLOP/s']:,.0f} GFLOP/s)).", "",
                 "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
        (RESULTS / f"{table}.md").write_text("\n".join(lines) + "\n")
