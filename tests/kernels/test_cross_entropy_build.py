"""The cross-entropy kernels as compiled for sm_80 and sm_90 (no GPU needed; its own process, the interpreter off).

Issue 14's bar for the variants the launchers run: the GEMM-shaped kernels (stats, dW) use wgmma on sm_90 and
mma.sync on sm_80 with async copies; none spills; at most 232 registers on sm_80; shared memory within the limit.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cross_entropy_kernels_build_for_a100_and_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-m", "sftfuse.kernels.compile_check", "--only", "cross_entropy"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [line.split() for line in p.stdout.splitlines() if line.startswith("lce_")]
    assert len(rows) == 30, p.stdout  # 3 dtypes x (2 stats + 1 grad + 2 dW variants) x 2 targets
    for label, sm, regs, spill, shared, limit, mma, copy, _secs, status in rows:
        assert status == "ok" and spill == "0" and int(shared) <= int(limit), label
        if sm == "80":
            assert int(regs) <= 232, (label, regs)
        if label.startswith(("lce_stats", "lce_dw")):
            assert mma == ("wgmma" if sm == "90" else "mma.sync"), (label, sm, mma)
            assert copy in ("cp.async", "tma"), (label, sm, copy)
