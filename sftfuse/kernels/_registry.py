"""Registries shared by every op: backend dispatch, kernels for the GPU compile check, numerics checks.

Each kernel file registers what it owns at import time: `<op>_triton.py` its kernels (`register_kernel`), the file
of its launchers (`<op>.py`, or `<op>_launch.py` beside a long one) its numerics check (`register_check`, which
needs the reference). The compile check and `sftfuse verify` walk the registries, so a new op joins both without
editing either tool. Each op's launcher asks `use_triton` in one place, and announces a fallback from the Triton
path once per process (`warn_once`).

Dispatch rule: Triton for CUDA tensors, PyTorch for CPU tensors, overridable with `SFTFUSE_BACKEND=torch|triton`
(the Triton path on CPU tensors needs the interpreter, `TRITON_INTERPRET=1` set before Triton is imported).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

BACKENDS = ("auto", "torch", "triton")


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """Environment variable `name`, lower-cased, checked against `choices` (the first is the default)."""
    choice = os.environ.get(name, choices[0]).strip().lower() or choices[0]
    if choice not in choices:
        raise ValueError(f"{name}={choice!r}: expected one of {choices}")
    return choice


def backend_choice() -> str:
    """The `SFTFUSE_BACKEND` override: 'auto' (default), 'torch' or 'triton'."""
    return env_choice("SFTFUSE_BACKEND", BACKENDS)


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when an op on `tensors` should take its Triton path."""
    choice = backend_choice()
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if choice == "torch":
        return False
    if choice == "triton":
        if not on_cuda and not interpreter_active():
            raise ValueError(
                "SFTFUSE_BACKEND=triton on CPU tensors needs the Triton interpreter: "
                "set TRITON_INTERPRET=1 before triton is imported"
            )
        return True
    return on_cuda


_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """`warnings.warn(message)` the first time this process meets `key` (one key per reason a path falls back),
    so a fallback taken on every call of a training step is reported once, not per call."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


_TOOLS = ("compile_check", "verify")  # modules of sftfuse.kernels that walk the registries instead of filling them


def import_kernel_modules(extra: tuple[str, ...] | list[str] = ()) -> None:
    """Import every op module of `sftfuse.kernels`, its Triton files included (and `extra` modules), so that
    their registrations run: kernels in `<op>_triton.py`, numerics checks beside the launchers."""
    import sftfuse.kernels as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_") and mod.name not in _TOOLS:
            importlib.import_module(f"sftfuse.kernels.{mod.name}")
    for name in extra:
        importlib.import_module(name)


# ---------------------------------------------------------------------------------------------------------------
# Kernels for the ahead-of-time compile check


@dataclass(frozen=True)
class KernelSpec:
    """One Triton kernel at one configuration, enough for `triton.compile(ASTSource(...))`.

    `signature` maps every argument to a Triton type ('*fp32', 'i32', 'constexpr', ...). `constexprs` gives the
    value of each 'constexpr' argument (and may pin integer arguments, such as a unit stride, to a constant).
    `divisible` names pointer and integer arguments promised to be multiples of 16, as the launcher guarantees.
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    divisible: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        meta = ",".join(f"{k}={v}" for k, v in self.constexprs.items() if k.isupper())
        return f"{self.name}[{meta},w{self.num_warps},s{self.num_stages}]"


_KERNELS: dict[str, Callable[[], list[KernelSpec]]] = {}


def register_kernel(name: str, specs: Callable[[], list[KernelSpec]]) -> None:
    """Register a function returning every configuration of kernel `name` that its launcher may pick."""
    _KERNELS[name] = specs


def registered_kernels() -> dict[str, Callable[[], list[KernelSpec]]]:
    return dict(_KERNELS)


# ---------------------------------------------------------------------------------------------------------------
# Numerics checks for `sftfuse verify`


@dataclass
class CheckResult:
    op: str
    path: str
    dtype: str
    shape: str
    max_err: float
    tol: float

    @property
    def passed(self) -> bool:
        return self.max_err <= self.tol  # NaN compares False: a NaN error fails


@dataclass
class CheckContext:
    """What a numerics check may use: the device, the dtypes, and whether to run realistic (GPU) shapes."""

    device: torch.device
    dtypes: tuple[torch.dtype, ...]
    large: bool
    results: list[CheckResult] = field(default_factory=list)


_CHECKS: dict[str, Callable[[CheckContext], None]] = {}


def register_check(name: str, fn: Callable[[CheckContext], None]) -> None:
    """Register `fn(ctx)`, which appends CheckResults to `ctx.results` for op `name`."""
    _CHECKS[name] = fn


def registered_checks() -> dict[str, Callable[[CheckContext], None]]:
    return dict(_CHECKS)


# ---------------------------------------------------------------------------------------------------------------
# Tolerances: one table for tests and `sftfuse verify`.
# Error allowed = atol + rtol * max|ref| (+ 2 * PyTorch's own error in the same dtype, where a baseline is given).

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 4e-3),
    torch.bfloat16: (1e-2, 2e-2),
}


def tolerance(ref: torch.Tensor, dtype: torch.dtype, baseline_err: float | None = None) -> float:
    atol, rtol = TOLERANCES[dtype]
    finite = ref[torch.isfinite(ref)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    tol = atol + rtol * scale
    if baseline_err is not None:
        tol += 2.0 * baseline_err
    return tol


def max_error(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """max |actual - ref| over finite entries; inf when NaN/Inf positions differ or shapes differ."""
    if actual.shape != ref.shape:
        return float("inf")
    a, r = actual.detach().double().cpu(), ref.detach().double().cpu()
    fa, fr = torch.isfinite(a), torch.isfinite(r)
    if not torch.equal(fa, fr) or not torch.equal(a[~fa].nan_to_num(), r[~fr].nan_to_num()):
        return float("inf")
    if not fa.any():
        return 0.0
    return float((a[fa] - r[fa]).abs().max())
