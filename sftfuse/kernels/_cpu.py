"""Every per-CPU choice of the PyTorch paths, made here from measurements of this host, and `cpu_plan()` saying why.

The choices: the dtype of 16-bit GEMMs (`gemm_dtype`: linear layers, LoRA, the NF4 matmul's decoded tiles, the loss
head), how CPU attention runs (`attention_mode`: torch's flash kernel timed in both dtypes, and the scores
path of `sftfuse.kernels.attention`), and the NF4 decode's tile sizes (`nf4_tiles`, from the L2 cache size). Kinds
of CPU they tell apart (this project's hosts):
- Intel Xeon with AMX-BF16: bf16 GEMMs 1.6-2.3 TFLOP/s against fp32's 0.21-0.35: GEMMs in bf16; attention as
  materialised scores through batched GEMMs (flash takes about the same time in both dtypes there, 1.4-1.6x the
  scores path).
- Intel Xeon with AVX512-BF16 and no AMX (or an AMX host with `ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`): bf16 GEMMs at
  about half the fp32 rate: GEMMs and attention in fp32.
- AMD EPYC (AVX512-BF16): bf16 about 2.5x fp32 on a Zen 4 (EPYC family 25, 432 against 173 GFLOP/s on 2
  cores), about 4x on a Zen 5: GEMMs in bf16; attention in fp32 where bf16's flash kernel is not 20% faster (Zen 4:
  bf16 1.9 ms, fp32 1.7).
`cpu_plan()` gathers the choices with the measured rates; the patch report and `sftfuse verify` print it.

The GEMM dtype: which dtype the PyTorch paths run their CPU GEMMs in, for 16-bit inputs: their own, or fp32.

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

import os
import re
import time
from dataclasses import dataclass
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
    best = _best_of((fa, fb), reps)
    return best[0], best[1]


def _best_of(fns, reps: int) -> tuple[float, ...]:
    """`_best_pair` for any number of functions: one warm-up call each, then `reps` rounds, every other one in
    reverse order."""
    for f in fns:
        f()
    best = [float("inf")] * len(fns)
    for i in range(reps):
        for k in (range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))):
            t0 = time.perf_counter()
            fns[k]()
            best[k] = min(best[k], time.perf_counter() - t0)
    return tuple(best)


_GEMM_SHAPE = (256, 512, 1024)  # (M, K, N) of the measured product
_MARGIN = 0.9  # fp32 must win by 10%: a tie keeps the native dtype (and its smaller transients)
# Attention the other way round: the native dtype must win by 20%, a tie runs in fp32. Its two timings are close on
# an AMX host (bf16 / fp32 measured 0.93-1.12 over a morning), so a 10% rule flipped with the host's load, and with
# it the run's numerics: two default runs, same seed, answered 60 and 56 of 65 general questions. fp32 costs only
# the casts there; without AMX it is 1.3-1.5x faster anyway; a Zen 5 (bf16 ~4x fp32) keeps bf16.
_ATTENTION_MARGIN = 0.8


def _measure_gemm(dtype: torch.dtype) -> tuple[float, float]:
    """(seconds of a `dtype` GEMM, seconds of the same GEMM in fp32 with the casts of its inputs and output), best
    of 7 alternating runs each (`_best_pair`) on a (256 x 512) @ (512 x 1024) product."""
    m, k, n = _GEMM_SHAPE
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, k, generator=gen).to(dtype)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        return _best_pair(lambda: torch.mm(a, b.t()), lambda: torch.mm(a.float(), b.float().t()).to(dtype))


@cache
def gemm_times(dtype: torch.dtype) -> tuple[float, float]:
    """`_measure_gemm`, once per dtype and process."""
    return _measure_gemm(dtype)


@cache
def fp32_gemm_is_faster(dtype: torch.dtype) -> bool:
    """True when an fp32 GEMM, casts of its inputs and output included, beats a `dtype` GEMM on this CPU by 10%."""
    native, wide = gemm_times(dtype)
    return wide < _MARGIN * native


def _measure_attention(dtype: torch.dtype) -> tuple[float, float, float]:
    """(seconds of torch's causal CPU flash attention in `dtype`, in fp32 with the casts, and of the scores
    path `sftfuse.kernels.attention`), forward and backward, best of 5 alternating runs: B=1, 4 heads, 256 tokens,
    head_dim 64 (SmolLM2's head size)."""
    from sftfuse.kernels.attention import scores_attention_bwd, scores_attention_fwd

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 256, 64, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run(wide: bool):
        ins = [t.float() for t in (q, k, v)] if wide else [q, k, v]
        out = sdpa(*ins, is_causal=True)
        torch.autograd.grad(out.to(dtype), (q, k, v), torch.ones_like(q))

    def scores():
        out, p = scores_attention_fwd(q.detach(), k.detach(), v.detach(), is_causal=True)
        scores_attention_bwd(torch.ones_like(out), q.detach(), k.detach(), v.detach(), p)

    with torch.autocast("cpu", enabled=False), torch.enable_grad():
        return _best_of((lambda: run(False), lambda: run(True), scores), reps=5)


@cache
def attention_times(dtype: torch.dtype) -> tuple[float, float, float]:
    """`_measure_attention`, once per dtype and process."""
    return _measure_attention(dtype)


ATTENTION_MODES = ("native", "fp32", "scores")


def attention_mode(dtype: torch.dtype, device: torch.device | str = "cpu", *, scores_ok: bool = True) -> str:
    """How CPU attention on `dtype` inputs runs: "native" (torch's function as called), "fp32" (torch's flash
    kernel on fp32 copies) or "scores" (`sftfuse.kernels.attention`: the scores materialised, batched GEMMs).
    Measured (`attention_times`): flash in `dtype` where it beats fp32 by 20%, else fp32 (a tie: see
    _ATTENTION_MARGIN); then the scores path where it beats that flash by 20% (a tie keeps flash's numerics) and
    the call allows it (`scores_ok`: its scores fit, see `sftfuse.kernels.attention.scores_fit`).
    `SFTFUSE_CPU_ATTENTION=native|fp32|scores` forces one (a call that cannot take the scores path then takes
    fp32); else `SFTFUSE_CPU_GEMM=native|fp32` forces the flash kernel in that dtype, as for GEMMs."""
    from sftfuse.kernels._registry import env_choice

    if torch.device(device).type != "cpu" or dtype in (torch.float32, torch.float64):
        return "native"
    forced = env_choice("SFTFUSE_CPU_ATTENTION", ("auto", *ATTENTION_MODES))
    if forced != "auto":
        return forced if forced != "scores" or scores_ok else "fp32"
    choice = _choice()
    if choice != "auto":
        return choice
    native, wide, scores = attention_times(dtype)
    flash, mode = (native, "native") if native < _ATTENTION_MARGIN * wide else (wide, "fp32")
    return "scores" if scores_ok and scores < _ATTENTION_MARGIN * flash else mode


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


def _l2_bytes() -> int:
    """This CPU's L2 cache per core, from sysfs (2 MiB when it cannot be read)."""
    for index in range(4):
        base = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}")
        try:
            if (base / "level").read_text().strip() == "2":
                size = (base / "size").read_text().strip().upper()
                return int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}[size[-1]] if size[-1] in "KM" else int(size)
        except (OSError, ValueError):
            continue
    return 2 << 20


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


@cache
def nf4_tiles() -> tuple[int, int]:
    """(values per decoded NF4 weight tile, values per decode step) for the CPU matmul, from the L2 size: L2 / 2
    values per tile, a 16-bit tile as large as L2 (2 MiB L2: 2^20 values, the size measured best here), at least
    2^20 (a 1 MiB L2 split SmolLM2's (1536 x 576) weights in two: two GEMMs and an fp32 sum of dx, 1.27x
    bitsandbytes' time against 1.02x whole on a 2-core AMD EPYC, with the native decode), and L2 / 8
    values per step, whose fp32 temporary fills half of L2 (2^18 values: 2^15 cost 1.6x the decode time on 2 quiet
    cores, each op's thread team paying for its start; much larger ones leave L2)."""
    l2 = _l2_bytes()
    return min(max(_pow2_floor(l2 // 2), 1 << 20), 1 << 22), min(max(_pow2_floor(l2 // 8), 1 << 15), 1 << 20)


def cpu_kind() -> str:
    """The vendor and the bf16 hardware oneDNN may use, from /proc/cpuinfo: 'Intel AMX-BF16', 'Intel AVX512-BF16 (no
    AMX)', 'AMD Zen 5 AVX512-BF16' (the AMD generation from the CPU family), '... AVX512 (no bf16)' or '... no
    AVX512'. With ONEDNN_MAX_CPU_ISA capped below a CPU's best (AVX512_CORE_BF16 on an AMX host, AVX512_CORE on a
    bf16 one), the kind it emulates, and the cap."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags = set(text.split())
    vendor = "AMD" if "AuthenticAMD" in flags else "Intel" if "GenuineIntel" in flags else "CPU"
    family = re.search(r"cpu family\s*:\s*(\d+)", text)
    if vendor == "AMD" and family and "avx512f" in flags:  # Zen 4 (family 25) and Zen 5 (26) differ: bf16 2.5x vs 4x
        vendor += {25: " Zen 4", 26: " Zen 5"}.get(int(family.group(1)), f" family {family.group(1)}")
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    capped = f", capped by ONEDNN_MAX_CPU_ISA={cap}" if cap and cap != "ALL" else ""
    if "amx_bf16" in flags and (not capped or "AMX" in cap):
        return f"{vendor} AMX-BF16"
    if "avx512_bf16" in flags and (not capped or "BF16" in cap or "AMX" in cap):
        no_amx = " (no AMX)" if vendor == "Intel" else ""
        return f"{vendor} AVX512-BF16{no_amx}" + (capped if "amx_bf16" in flags else "")
    if "avx512f" in flags:
        return f"{vendor} AVX512 (no bf16)" + (capped if "avx512_bf16" in flags else "")
    return f"{vendor} no AVX512"


_ATTENTION_SAYS = {"native": "flash in bf16", "fp32": "flash in fp32", "scores": "scores (S in fp32, bf16 GEMMs)"}


@dataclass(frozen=True)
class CpuPlan:
    """The per-CPU choices of this process, with the measurements behind them (`cpu_plan`)."""

    kind: str
    threads: int
    override: str  # SFTFUSE_CPU_GEMM
    bf16_gflops: float  # the measured bf16 GEMM rate
    fp32_gflops: float  # the measured fp32 GEMM rate (casts included)
    gemm: torch.dtype  # for bf16 operands
    attention: str  # for bf16 q, k, v: `attention_mode`
    attention_ms: tuple[float, float, float]  # (flash bf16, flash fp32, scores) forward + backward of the probe
    nf4_tile: int
    nf4_step: int
    nf4_decode: str  # `sftfuse.kernels._native.describe()`: native (AVX-512 or scalar C) or torch ops

    @property
    def best_gflops(self) -> float:
        """The faster of the two GEMM rates: the host's FLOP rate that the benchmarks' floors divide by."""
        return max(self.bf16_gflops, self.fp32_gflops)

    def __str__(self) -> str:
        def name(dt):
            return str(dt).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")

        why = "forced by SFTFUSE_CPU_GEMM" if self.override != "auto" else "measured faster"
        return (f"CPU plan: {self.kind}, {self.threads} threads. GEMM bf16 {self.bf16_gflops:,.0f} vs fp32 "
                f"{self.fp32_gflops:,.0f} GFLOP/s -> 16-bit GEMMs in {name(self.gemm)} ({why}); attention flash bf16 "
                f"{self.attention_ms[0]:.2f}, flash fp32 {self.attention_ms[1]:.2f}, scores "
                f"{self.attention_ms[2]:.2f} ms -> {_ATTENTION_SAYS[self.attention]}; "
                f"{self.nf4_decode} to {name(self.gemm)} tiles of {self.nf4_tile:,} values, {self.nf4_step:,} per "
                f"step (L2 {_l2_bytes() >> 10} KiB)")


@cache
def cpu_plan() -> CpuPlan:
    """Every per-CPU choice for bf16 work on this host, measured once per process (a few tens of milliseconds)."""
    m, k, n = _GEMM_SHAPE
    native, wide = gemm_times(torch.bfloat16)
    att = attention_times(torch.bfloat16)
    tile, step = nf4_tiles()
    from sftfuse.kernels._native import describe

    return CpuPlan(cpu_kind(), torch.get_num_threads(), _choice(), 2 * m * k * n / native / 1e9,
                   2 * m * k * n / wide / 1e9, gemm_dtype(torch.bfloat16), attention_mode(torch.bfloat16),
                   tuple(t * 1e3 for t in att), tile, step, describe())
