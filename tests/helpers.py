"""Helpers the tests share: fresh random inputs, poisoned buffers, closeness to a higher-precision reference."""

from __future__ import annotations

import torch

from sftfuse.kernels._registry import max_error, tolerance

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def randn(*shape, dtype=torch.float32, device=DEVICE, scale=1.0, requires_grad=False):
    """Random normal input that cannot be mistaken for zeros (no exact zeros)."""
    x = torch.randn(*shape, dtype=torch.float32, device=device) * scale
    x = torch.where(x == 0, torch.full_like(x, 1e-3), x)
    return x.to(dtype).requires_grad_(requires_grad)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a buffer with NaN (floats) or a sentinel (ints) so an unwritten element is caught."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-7)


def assert_close(actual: torch.Tensor, ref: torch.Tensor, *, dtype: torch.dtype | None = None,
                 baseline: torch.Tensor | None = None, name: str = "output") -> float:
    """Fail unless `actual` matches the high-precision `ref`, NaN/Inf positions included.

    Error allowed: atol + rtol * max|ref| for `dtype` (default: actual.dtype), from the one tolerance table in
    `sftfuse.kernels._registry.TOLERANCES`; when `baseline` (PyTorch's own result in the same low precision) is
    given, 2 * its error against `ref` is added: we are held to PyTorch's own precision, not a looser one.
    """
    dtype = dtype or actual.dtype
    base_err = max_error(baseline, ref) if baseline is not None else None
    tol = tolerance(ref.double(), dtype, base_err)
    err = max_error(actual, ref)
    assert err <= tol, f"{name}: max error {err:.3e} > tolerance {tol:.3e} ({dtype}, shape {tuple(ref.shape)})"
    return err
