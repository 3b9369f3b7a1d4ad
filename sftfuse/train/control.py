"""How the processes of a distributed run agree: rank 0 decides, the others hear it, nobody waits forever.

Every decision that could differ between processes (early stopping on a validation loss, a refused output
directory, a failed checkpoint write, a non-finite step) is taken on rank 0 or reduced over all processes and
sent to every process, so they never take different branches and hang in a collective that some never join.
These small messages travel on their own gloo group made with a long timeout (`WAIT`): the other processes wait in
it while rank 0 alone evaluates the base model or writes files, which may take longer than the default group's
timeout (10 or 30 minutes). With one process every method is a no-op.
"""

from __future__ import annotations

from datetime import timedelta

import torch

WAIT = timedelta(hours=12)


class Control:
    """The control channel of a run of `world` processes (`group` is None when world == 1)."""

    def __init__(self, world: int, rank: int):
        self.world, self.rank = world, rank
        self.group = torch.distributed.new_group(backend="gloo", timeout=WAIT) if world > 1 else None

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier(group=self.group)

    def from_rank0(self, obj):
        """Rank 0's `obj` (anything picklable, sent by rank 0 only) on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_ok(self, ok: bool) -> bool:
        """True on every process when `ok` is true on every process."""
        return self.sum([0.0 if ok else 1.0])[0] == 0.0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all processes."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t, group=self.group)
        return t.tolist()

    def on_rank0(self, fn, errors: type[Exception]):
        """Run `fn()` on rank 0; an `errors` exception there is raised on every process. Returns fn's value on
        rank 0, None elsewhere."""
        value, message = None, None
        if self.rank == 0:
            try:
                value = fn()
            except errors as e:
                message = str(e)
        message = self.from_rank0(message)
        if message is not None:
            raise errors(message)
        return value
