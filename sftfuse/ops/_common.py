"""Helpers shared by the autograd Functions of `sftfuse.ops`."""

from __future__ import annotations

import contextlib
import functools

import torch


def without_autocast(fn):
    """Run a Function's forward or backward with autocast off: the kernels choose their own dtypes, and under
    autocast a matmul inside them would be recast (the PyTorch paths' fp32 CPU GEMMs back to bf16, say)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)

    return run

