"""The GPU build check, run as its own process: it compiles, so the Triton interpreter must be off."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "kernels"), str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "sftfuse.kernels.compile_check", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


def test_sample_kernel_builds_and_is_reported():
    p = _run("--module", "sample_kernels", "--only", "sample_matmul")
    assert "sample_matmul[BLOCK_M=64" in p.stdout
    # the good config builds for both targets with tensor cores; the oversized tile is caught by the limit
    good = [line for line in p.stdout.splitlines() if line.startswith("sample_matmul[BLOCK_M=64")]
    assert len(good) == 2 and all(line.rstrip().endswith("ok") for line in good), p.stdout
    assert any(" 90 " in line and "wgmma" in line for line in good), p.stdout
    assert any(" 80 " in line and "mma.sync" in line for line in good), p.stdout
    big = [line for line in p.stdout.splitlines() if line.startswith("sample_matmul_too_big")]
    assert len(big) == 2 and all(re.search(r"shared \d+ B > limit", line) for line in big), p.stdout
    # masked element loads (K of unknown divisibility) feed the MMA synchronously: flagged, on both targets
    sync = [line for line in p.stdout.splitlines() if line.startswith("sample_matmul_sync")]
    assert len(sync) == 2 and all("without cp.async or TMA" in line for line in sync), p.stdout
    assert not any("without cp.async" in line for line in good), p.stdout
    assert p.returncode == 1, p.stdout + p.stderr


def test_every_registered_kernel_builds():
    """Every kernel in the package, at every config its launcher may pick, for sm_80 and sm_90: no spills."""
    p = _run()
    print(p.stdout)
    assert p.returncode == 0, p.stdout + p.stderr
