"""Linear + cross-entropy, forward + backward: sftfuse vs eager (full logits) vs torch's chunked op, same inputs.

Shapes: the SmolLM2 head (H=576, V=49152, 2048 tokens) and a Llama-3 head (H=2048, V=128256, 256 tokens: fewer
on CPU), half of the rows masked (prompt tokens), fp32 and bf16; and the SmolLM2 head frozen, as LoRA trains it
(only grad_hidden wanted). Peak memory is what the call needs beyond the inputs (gradients included, for every
impl alike).

FLOPs counted for every impl as the useful work, 6 n H V for n counted tokens (logits, grad_hidden,
grad_weight; 4 n H V for a frozen head); eager and torch's op also spend it on masked rows, which is why they can
lose.

Peak memory is measured in a fresh process per case (`python bench/test_cross_entropy.py SHAPE DTYPE IMPL`: one
warm-up call, then the peak of one more), as the end-to-end bench does: measured in this process after the LoRA
and NF4 benches, the same sftfuse call read 120.4-122 MB where a fresh process reads 118.6 MB (AMD Zen 5), the
difference being what earlier tests left in the heap and the BLAS pools, and at the SmolLM2 head a megabyte is
0.001x of eager's peak.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import peak_memory, run_fresh, x_floor

from sftfuse.ops.cross_entropy import linear_cross_entropy

SHAPES = {"smollm2": (2048, 576, 49152), "smollm2_frozen": (2048, 576, 49152), "llama3": (256, 2048, 128256)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("eager", "torch_chunked", "sftfuse")  # baselines first: sftfuse's row carries the ratios
_RESULTS: dict[tuple[str, str], dict[str, tuple[float, int]]] = {}
_INPUTS: dict[tuple[str, str], tuple] = {}


def _inputs(shape: str, dtype: str):
    if (shape, dtype) not in _INPUTS:
        _INPUTS.clear()  # one shape's tensors at a time (the Llama-3 head is 1 GB in fp32)
        n, H, V = SHAPES[shape]
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(n, H, generator=gen).to(DTYPES[dtype]).requires_grad_()
        weight = (torch.randn(V, H, generator=gen) * H**-0.5).to(DTYPES[dtype]).requires_grad_(
            not shape.endswith("_frozen"))
        labels = torch.randint(0, V, (n,), generator=gen)
        labels[torch.rand(n, generator=gen) < 0.5] = -100
        _INPUTS[(shape, dtype)] = (hidden, weight, labels)
    return _INPUTS[(shape, dtype)]


def _step(impl, hidden, weight, labels):
    loss = _loss(impl, hidden, weight, labels)
    loss.backward()
    hidden.grad = weight.grad = None


def _fresh_peak(shape: str, dtype: str, impl: str) -> int:
    """Peak bytes of one call of `impl` beyond its inputs, measured in a fresh process (module docstring)."""
    row = run_fresh(__file__, [shape, dtype, impl], 900)
    if "error" in row:
        raise RuntimeError(f"peak memory of {shape} {dtype} {impl}: {row['error']}")
    return int(row["peak"])


def _loss(impl, hidden, weight, labels):
    if impl == "eager":
        return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100)
    if impl == "torch_chunked":
        return F.linear_cross_entropy(hidden, weight, labels, ignore_index=-100,
                                      options=torch.nn.LinearCrossEntropyOptions())
    return linear_cross_entropy(hidden, weight, labels)


CASES = [(s, d, i) for s in SHAPES for d in DTYPES for i in IMPLS]


@pytest.mark.parametrize("shape, dtype, impl", CASES, ids=["-".join(c) for c in CASES])
def test_linear_cross_entropy(benchmark, bench_record, shape, dtype, impl):
    hidden, weight, labels = _inputs(shape, dtype)

    def step():
        _step(impl, hidden, weight, labels)

    rounds = 3 if shape.startswith("smollm2") else 1
    times = []

    def timed():
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
    seconds = sorted(times[-rounds:])[rounds // 2]
    mem = _fresh_peak(shape, dtype, impl)
    n, H, V = SHAPES[shape]
    counted = int((labels != -100).sum())
    flops = (4 if shape.endswith("_frozen") else 6) * counted * H * V  # useful work: (counted x H x V) matmuls
    row = {"shape": f"{shape} n={n} H={H} V={V}", "dtype": dtype, "impl": impl, "seconds": seconds,
           "GFLOP/s": flops / seconds / 1e9, "x floor": x_floor(seconds, flops), "peak_MB": mem / 1e6}
    _RESULTS.setdefault((shape, dtype), {})[impl] = (seconds, mem)
    base = _RESULTS[(shape, dtype)]
    if impl == "sftfuse" and "eager" in base and "torch_chunked" in base:
        row["time_vs_eager"] = seconds / base["eager"][0]
        row["time_vs_torch_chunked"] = seconds / base["torch_chunked"][0]
        row["mem_vs_eager"] = mem / max(base["eager"][1], 1)
    benchmark.extra_info.update(row)
    bench_record("cross_entropy", row)


if __name__ == "__main__":  # one case's peak memory in this fresh process (`_fresh_peak`)
    _case = _inputs(sys.argv[1], sys.argv[2])
    _step(sys.argv[3], *_case)  # warm-up
    print(json.dumps({"peak": peak_memory(lambda: _step(sys.argv[3], *_case))}))
