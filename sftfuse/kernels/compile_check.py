"""Ahead-of-time GPU build check, no GPU needed: `python -m sftfuse.kernels.compile_check`.

Compiles every registered Triton kernel, at every configuration its launcher may pick, for sm_80 (A100) and
sm_90 (H100/H200) with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`. From the cubin,
read with the `cuobjdump` bundled in Triton, it takes registers and local/stack bytes (spills); from the
compiled metadata the dynamic shared memory, compared with the target's per-block limit (which the compile
itself does not enforce); from the PTX whether the kernel uses tensor-core MMA (`wgmma` or `mma.sync`) and
async copies (`cp.async`, TMA `cp.async.bulk`). Exits non-zero if a kernel fails to compile, spills, needs
more shared memory than the target has, more registers than REG_LIMIT (232 on sm_80), or uses tensor-core MMA
with its operands loaded synchronously (neither cp.async nor TMA).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Compiling needs the real JIT, never the interpreter.
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("compile_check needs TRITON_INTERPRET unset (it compiles for real GPUs, it does not run)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sftfuse.kernels._registry import KernelSpec, import_kernel_modules, registered_kernels  # noqa: E402

# Largest dynamic shared memory a block may opt into, in bytes (CUDA occupancy tables).
SHARED_LIMIT = {80: 166_912, 90: 232_448}
# Most registers per thread a configuration may take: at 255 on sm_80 ptxas has no headroom left and the next change
# spills; 232 keeps room (issue 14). sm_90's warpgroup MMAs keep their accumulators in registers: the hardware's 255.
REG_LIMIT = {80: 232, 90: 255}
TARGETS = (80, 90)


@dataclass
class Row:
    label: str
    cap: int
    regs: int = -1
    spill: int = -1
    shared: int = -1
    mma: str = "-"
    async_copy: str = "-"
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return (not self.error and self.spill == 0 and 0 <= self.shared <= SHARED_LIMIT[self.cap]
                and self.regs <= REG_LIMIT[self.cap] and not self.sync_operands)

    @property
    def sync_operands(self) -> bool:
        """A tensor-core kernel that loads its operands without async copies (no cp.async, no TMA): each MMA then
        waits on a plain global load, and the kernel cannot overlap memory with math (issue 14)."""
        return self.mma != "-" and self.async_copy == "-"

    def problem(self) -> str:
        if self.error:
            return self.error
        problems = [f"spills {self.spill} B"] if self.spill else []
        if self.shared > SHARED_LIMIT[self.cap]:
            problems.append(f"shared {self.shared} B > limit")
        if self.regs > REG_LIMIT[self.cap]:
            problems.append(f"{self.regs} registers > {REG_LIMIT[self.cap]}")
        if self.sync_operands:
            problems.append(f"{self.mma} without cp.async or TMA")
        return ", ".join(problems) or "ok"


def _cuobjdump() -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise SystemExit(f"cuobjdump not found at {path}: this Triton wheel ships no NVIDIA tools")
    return str(path)


def _resources(cubin: bytes, name: str) -> tuple[int, int]:
    """(registers, stack + local bytes) of function `name` from `cuobjdump -res-usage`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    block = out.split(f"Function {name}:", 1)[-1]
    regs = int(re.search(r"REG:(\d+)", block).group(1))
    spill = int(re.search(r"STACK:(\d+)", block).group(1)) + int(re.search(r"LOCAL:(\d+)", block).group(1))
    return regs, spill


def _ptx_features(ptx: str) -> tuple[str, str]:
    mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "-")
    if "cp.async.bulk" in ptx:
        copy = "tma"
    elif "cp.async" in ptx:
        copy = "cp.async"
    else:
        copy = "-"
    return mma, copy


def compile_one(spec: KernelSpec, cap: int) -> Row:
    row = Row(spec.label, cap)
    names = spec.fn.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.divisible}
    t0 = time.perf_counter()
    try:
        src = ASTSource(spec.fn, dict(spec.signature), constexprs=dict(spec.constexprs), attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                           options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        row.regs, row.spill = _resources(k.asm["cubin"], k.metadata.name)
        row.shared = int(k.metadata.shared)
        row.mma, row.async_copy = _ptx_features(k.asm["ptx"])
    except Exception as e:  # a failed compile is a result to report, not a crash of the checker
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    row.seconds = time.perf_counter() - t0
    return row


def run(extra_modules: list[str] = (), only: str | None = None, caps=TARGETS) -> list[Row]:
    import_kernel_modules(extra_modules)
    rows = []
    for name, specs in sorted(registered_kernels().items()):
        if only and only not in name:
            continue
        for spec in specs():
            for cap in caps:
                rows.append(compile_one(spec, cap))
    return rows


def format_table(rows: list[Row]) -> str:
    head = ("kernel", "sm", "regs", "spill B", "shared B", "limit B", "mma", "async", "s", "status")
    body = [(r.label, str(r.cap), str(r.regs), str(r.spill), str(r.shared), str(SHARED_LIMIT[r.cap]), r.mma,
             r.async_copy, f"{r.seconds:.1f}", r.problem()) for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", action="append", default=[], help="also import this module's registered kernels")
    ap.add_argument("--only", help="only kernels whose name contains this")
    args = ap.parse_args(argv)
    rows = run(args.module, args.only)
    if not rows:
        print("compile_check: no Triton kernel is registered", file=sys.stderr)
        return 1
    print(format_table(rows))
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} kernel configurations build for sm_80 and sm_90 without spills, "
          "within the register and shared-memory limits, every MMA fed by async copies")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
