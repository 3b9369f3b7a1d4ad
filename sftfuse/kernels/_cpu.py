"""Which dtype the PyTorch paths run their CPU GEMMs in, for 16-bit inputs: their own, or fp32.

A bf16 GEMM is only faster than fp32 where the CPU has bf16 matrix units (AMX on Sapphire Rapids and later).
With AVX512-BF16 alone oneDNN's bf16 GEMM can be the slower one: on this project's 2-core Xeon
(avx512_bf16, no AMX) a (1024 x 576) @ (576 x 1536) GEMM ran at 170 GFLOP/s in bf16 and 320 in fp32. So the
choice is measured once per process (`fp32_gemm_is_faster`, a few milliseconds), not assumed.

Computing a 16-bit GEMM in fp32 loses nothing: a product of two bf16 (or fp16) values is exact in fp32 and both
accumulate in fp32; only the fp32 copies of the operands are extra, and they are transient (a tile of weight and
one activation). Saved activations stay in their own dtype.

`SFTFUSE_CPU_GEMM=auto|native|fp32` overrides the choice (auto, the default, measures).
"""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path

import torch

CHOICES = ("auto", "native", "fp32")


def _choice() -> str:
    from sftfuse.kernels._registry import env_choice

    return env_choice("SFTFUSE_CPU_GEMM", CHOICES)


def _best_pair(fa, fb, reps: int = 7) -> tuple[float, float]:
    """Best time of each of two functions over `reps` rounds, run alternately (the order swapped every round).

    Timed one after the other, a burst of load on a busy host (another process, a thread team still spinning)
    could cover all of one function's runs: the native bf16 GEMM then looked slower than fp32 and an AMX host, where
    bf16 is 10x faster, ran every GEMM in fp32 (a QLoRA step 8.6 s instead of 1.7 s). Alternating, a burst hits both.
    """
    fa()
    fb()
    best = [float("inf"), float("inf")]
    for i in range(reps):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            (fa, fb)[k]()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best[0], best[1]


@cache
def fp32_gemm_is_faster(dtype: torch.dtype) -> bool:
    """True when an fp32 GEMM, casts of its inputs and output included, beats a `dtype` GEMM on this CPU.

    Measured once per dtype and process on a (256 x 512) @ (512 x 1024) product, best of 7 alternating runs each
    (`_best_pair`); fp32 must win by 10%, so a tie keeps the native dtype (and its smaller transients).
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(256, 512, generator=gen).to(dtype)
    b = torch.randn(1024, 512, generator=gen).to(dtype)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        native, wide = _best_pair(lambda: torch.mm(a, b.t()), lambda: torch.mm(a.float(), b.float().t()).to(dtype))
    return wide < 0.9 * native


def gemm_dtype(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype to run a GEMM on `dtype` operands in: `dtype` itself, or fp32 where that is faster here."""
    if torch.device(device).type != "cpu" or dtype in (torch.float32, torch.float64):
        return dtype
    choice = _choice()
    if choice == "native":
        return dtype
    if choice == "fp32" or fp32_gemm_is_faster(dtype):
        return torch.float32
    return dtype


@cache
def cpu_has_bf16() -> bool:
    """True when this CPU has bf16 instructions (AVX512-BF16 or AMX-BF16) and torch computes a bf16 matmul right.

    This says whether bf16 is native here (the trainer's 'auto' compute dtype); whether a bf16 GEMM is also the
    faster one is `fp32_gemm_is_faster`.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        return False
    try:
        a = torch.ones(8, 8, dtype=torch.bfloat16)
        return bool((a @ a)[0, 0] == 8)
    except RuntimeError:
        return False
