"""`sftfuse verify`: every registered op's numerics check on this machine, as one table.

On a GPU it runs the Triton path at realistic shapes in bf16 and fp32; without one, the Triton path in the
interpreter at small shapes (fp32 only: the interpreter computes bf16 arithmetic wrongly). Each result is the
max error against the op's PyTorch reference in fp64, next to the tolerance it must meet. Above the table: the
CPU plan (`sftfuse.kernels._cpu.cpu_plan`), the dtypes and tiles the PyTorch paths chose on this host, and why.
"""

from __future__ import annotations

import os
import sys


def run_verify(only: str | None = None) -> int:
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise RuntimeError("verify without a GPU needs the Triton interpreter, but Triton is already imported")
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ["SFTFUSE_BACKEND"] = "triton"

    from sftfuse.kernels._registry import CheckContext, import_kernel_modules, registered_checks

    import_kernel_modules()
    ctx = CheckContext(
        device=torch.device("cuda" if on_gpu else "cpu"),
        dtypes=(torch.float32, torch.bfloat16) if on_gpu else (torch.float32,),
        large=on_gpu,
    )
    checks = {k: v for k, v in registered_checks().items() if not only or only in k}
    if not checks:
        print("verify: no numerics check is registered", file=sys.stderr)
        return 1
    for _, fn in sorted(checks.items()):
        fn(ctx)
    where = torch.cuda.get_device_name() if on_gpu else "CPU, Triton interpreter"
    print(f"sftfuse verify on {where}\n")
    from sftfuse.kernels._cpu import cpu_plan

    print(f"{cpu_plan()}\n")  # what the PyTorch (CPU) paths chose on this host, and the measurements why
    head = ("op", "path", "dtype", "shape", "max err", "tol", "result")
    rows = [(r.op, r.path, r.dtype, r.shape, f"{r.max_err:.2e}", f"{r.tol:.2e}", "pass" if r.passed else "FAIL")
            for r in ctx.results]
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    for i, line in enumerate([head, *rows]):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    failed = sum(not r.passed for r in ctx.results)
    print(f"\n{len(ctx.results) - failed} passed, {failed} failed")
    return 1 if failed or not ctx.results else 0
