"""The LoRA dropout mask of the PyTorch (CPU) path: the positions it drops, drawn as geometric gaps.

Dropping each of n elements independently with probability p is the same as walking the elements with gaps
G ~ Geometric(p) (P(G = k) = (1 - p)^k p, the number of kept elements before the next dropped one) between the
dropped ones. A gap is floor(log U / log(1 - p)) for U uniform on (0, 1) (P(G >= k) = P(U <= (1 - p)^k)), with U a
32-bit draw of torch's own CPU generator (mt19937) seeded by the adapter's seed, and the dropped positions are the
running sum of gaps + 1. So a mask is a pure function of (seed, n, p): a fixed seed reproduces it, and
mt19937 runs on one thread whatever torch's thread count.

Why: the work is about p n draws, not n. The mask it replaced, drawn per element (an int16 draw and a compare per
element, kept as bits, applied with torch.where in the forward and masked_fill and torch.where in the backward),
cost about 1.6 ms per (1024 x 576) adapter input on a 2-core AMD EPYC, seven times the adapter's own GEMMs there
(0.22 ms); this one about 0.5 ms, forward and backward: the positions drawn twice (0.15 ms each: p n = 30 K
draws), zeroed by `index_fill_` (p n writes) in a copy of x and in u A. No dense boolean mask is ever built, and
the backward draws the positions again from the seed instead of keeping anything.

The Triton path keeps its own counter-based hash (`sftfuse.kernels.lora.dropout_mask`), computed in registers.
"""

from __future__ import annotations

import math
import threading

import torch


def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p: expected 0 <= p < 1, got {p}")


def drop_positions(seed: int, numel: int, p: float, *, device=None) -> torch.Tensor:
    """Flat positions (int64, sorted, distinct, all < numel) of the dropped elements among `numel`, each dropped
    independently with probability p: a pure function of (seed, numel, p). Drawn on the CPU, moved to `device`.

    U is a 32-bit draw, w / 2^32 + 1/2 for a signed word w, in fp32 (2^-24 apart near 1, finer below; the one
    w that gives 0 is raised to 2^-33, so log U is finite): a gap's law P(G >= k) = (1 - p)^k holds to about
    2^-24 per k, the fp32 log adding an error of the same order. Gaps are summed in int64, exact for any numel.
    fp32, not fp64: the chain of ops on the draws took 63 us against 89 (30 K draws, 2 cores).
    """
    _check_p(p)
    if p == 0.0 or numel <= 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    gen = torch.Generator().manual_seed(int(seed))
    per_log = 1.0 / math.log1p(-p)
    parts, last = [], -1  # positions drawn so far end at `last`
    while last < numel - 1:
        left = (numel - 1 - last) * p  # dropped positions expected in what is left, drawn with 6 sigma to spare
        words = torch.empty(int(left + 6 * math.sqrt(left) + 16) // 2 + 1, dtype=torch.int64)
        u = words.random_(-(2**63), None, generator=gen).view(torch.int32).to(torch.float32)
        # gap + 1 = floor(log U / log(1 - p)) + 1 = trunc(log U / log(1 - p) + 1), the quotient being >= 0
        steps = u.mul_(2.0**-32).add_(0.5).clamp_min_(2.0**-33).log_().mul_(per_log).add_(1).to(torch.int64)
        pos = steps.cumsum_(0).add_(last)
        parts.append(pos)
        last = int(pos[-1])
    pos = torch.cat(parts) if len(parts) > 1 else parts[0]
    pos = pos[: int(torch.searchsorted(pos, numel))]  # those < numel
    return pos if device is None or torch.device(device).type == "cpu" else pos.to(device)


def zero_at(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`t` (contiguous) with its flat elements at `positions` set to 0, in place."""
    return t.view(-1).index_fill_(0, positions, 0).view(t.shape)


_SCRATCH_MAX = 1 << 24  # values: a larger x gets a fresh copy each call
_local = threading.local()  # per thread: {(device, dtype): buffer}


def dropped_copy(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A copy of x with its flat elements at `positions` zeroed, for one GEMM that reads it at once: it lives in a
    buffer this thread reuses (the next call overwrites it), up to 2^24 values.

    Why a reused buffer: a fresh copy of a (1024 x 1536) bf16 x took 0.9 ms where its copy takes 60 us, the rest
    page faults on newly mapped memory (glibc maps blocks this large afresh), on a 2-core AMD EPYC.
    """
    n = x.numel()
    if n > _SCRATCH_MAX:
        return zero_at(x.clone(memory_format=torch.contiguous_format), positions)  # one copy, row-major
    bufs = _local.__dict__.setdefault("bufs", {})
    key = (x.device, x.dtype)
    buf = bufs.get(key)
    if buf is None or buf.numel() < n:
        buf = bufs[key] = torch.empty(n, dtype=x.dtype, device=x.device)
    return zero_at(buf[:n].view(x.shape).copy_(x), positions)


def drop_mask(positions: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The dense bool mask (rows, cols) of `positions` (True = dropped): for tests and oracles, not the hot path."""
    mask = torch.zeros(rows * cols, dtype=torch.bool, device=positions.device)
    return mask.index_fill_(0, positions, True).view(rows, cols)
