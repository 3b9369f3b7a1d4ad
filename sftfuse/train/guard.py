"""The finite-loss guard of `sftfuse train`: a diverged run stops with a message and keeps its last good adapter.

A step whose loss or global gradient norm is not finite (NaN or inf, on any process) changes no weight: the
optimizer step is skipped and the gradients are dropped. The scheduler still advances and the step still counts,
so that the learning-rate schedule, the planned number of steps and the position in the data stream stay those of
an uninterrupted run. `max_bad_steps` such steps in a row stop the run: the weights go back to the last ones that
gave a finite loss (kept in a copy of the fp32 adapter masters, refreshed before every update), that adapter is
written as the run's adapter, and `train()` raises `DivergedError` after the report is written.
"""

from __future__ import annotations

import torch

from sftfuse.train.outdir import RunError


class DivergedError(RunError):
    """The loss stayed non-finite for `max_bad_steps` steps in a row."""


class FiniteGuard:
    """Counts non-finite steps and keeps the last weights that gave a finite loss.

    Args:
        masters: the fp32 adapter weights the optimizer updates (copied once, then refreshed in place).
        max_bad: non-finite steps in a row that stop the run.
        in_a_row, total: counts carried over from a checkpoint.
    """

    def __init__(self, masters: list[torch.Tensor], *, max_bad: int, in_a_row: int = 0, total: int = 0):
        self.masters, self.max_bad = masters, max(int(max_bad), 1)
        self.in_a_row, self.total = in_a_row, total
        self.good = [m.detach().clone() for m in masters]

    @torch.no_grad()
    def keep(self) -> None:
        """The current weights gave a finite loss: remember them (called before an update)."""
        for g, m in zip(self.good, self.masters, strict=True):
            g.copy_(m)

    @torch.no_grad()
    def restore(self) -> None:
        for m, g in zip(self.masters, self.good, strict=True):
            m.copy_(g)

    def record(self, *, step: int, finite: bool, lr: float) -> str | None:
        """Count step `step`; returns the message to stop with when it is the `max_bad`-th bad one in a row."""
        if finite:
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row < self.max_bad:
            return None
        return (f"training diverged: the loss or the gradient norm was not finite (NaN or inf) for {self.in_a_row} "
                f"steps in a row (steps {step - self.in_a_row + 1}-{step}; max_bad_steps={self.max_bad}); the adapter "
                f"keeps the weights of the last step with a finite loss. Lower lr (the learning rate was {lr:.3g}) "
                "or raise warmup_steps, and run again")
