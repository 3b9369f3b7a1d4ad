"""sftfuse.kernels._cpu: the per-process choices survive a burst of load on the host, and the plan says them."""

from __future__ import annotations

import itertools

import pytest
import torch

from sftfuse.kernels import _cpu


def _burst_clock(monkeypatch, burst: int, penalty: float = 1.0) -> None:
    """Make the first `burst` timed runs read `penalty` seconds slower, as if another process took the CPU then."""
    real = _cpu.time.perf_counter
    readings = itertools.count()
    extra = [0.0]

    def clock():
        n = next(readings)
        if n % 2 == 1 and n // 2 < burst:  # the end reading of one of the first `burst` measurements
            extra[0] += penalty
        return real() + extra[0]

    monkeypatch.setattr(_cpu.time, "perf_counter", clock)


@pytest.mark.parametrize("burst", [5, 7])
def test_a_load_burst_does_not_flip_the_gemm_dtype(monkeypatch, burst):
    """A burst covering as many runs as one side used to take on its own (5 with the sequential measurement) left
    that side with no clean run: on an AMX host it made bf16 look slower than fp32. Alternating runs keep clean ones
    on both sides, so the choice is the one measured on a quiet clock."""
    def fp32_wins():
        native, wide = _cpu._measure_gemm(torch.bfloat16)
        return wide < _cpu._MARGIN * native

    quiet = fp32_wins()
    _burst_clock(monkeypatch, burst)
    assert fp32_wins() == quiet


def test_best_pair_alternates_and_keeps_each_best():
    calls = []
    best = _cpu._best_pair(lambda: calls.append("a"), lambda: calls.append("b"), reps=4)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then the order swaps each round
    assert all(0 <= t < 0.1 for t in best)


def test_plan_applies_its_choices_and_says_them(monkeypatch):
    """The plan's GEMM and attention dtypes are the ones the ops ask for, its rates are the measured ones, and the
    override switches both dtypes at once."""
    plan = _cpu.cpu_plan()
    assert plan.gemm == _cpu.gemm_dtype(torch.bfloat16) and plan.attention == _cpu.attention_mode(torch.bfloat16)
    assert len(plan.attention_ms) == 3 and all(t > 0 for t in plan.attention_ms)
    m, k, n = _cpu._GEMM_SHAPE
    assert plan.bf16_gflops == pytest.approx(2 * m * k * n / _cpu.gemm_times(torch.bfloat16)[0] / 1e9)
    assert plan.best_gflops == max(plan.bf16_gflops, plan.fp32_gflops) > 0
    text = str(plan)
    assert plan.kind in text and "GEMMs in" in text and "scores" in text and "NF4 decode" in text
    tile, step = _cpu.nf4_tiles()
    assert tile & (tile - 1) == 0 and step & (step - 1) == 0 and step <= tile
    for choice, dtype in (("fp32", torch.float32), ("native", torch.bfloat16)):
        monkeypatch.setenv("SFTFUSE_CPU_GEMM", choice)
        assert _cpu.gemm_dtype(torch.bfloat16) == dtype and _cpu.attention_mode(torch.bfloat16) == choice
    assert _cpu.attention_mode(torch.bfloat16, "cuda") == "native"  # GPUs are not this file's business


@pytest.mark.parametrize("bf16_ms,fp32_ms,scores_ms,expect", [
    (1.11, 1.20, 1.0, "fp32"), (1.68, 1.50, 1.3, "fp32"), (1.0, 1.3, 0.9, "native"), (1.5, 1.1, 2.0, "fp32"),
    (1.33, 1.32, 0.69, "scores"),  # this project's AMX Xeon: the scores path at half of flash's time
    (1.0, 1.3, 0.7, "scores"), (1.9, 1.7, 1.4, "fp32")])  # a Zen 4's flash figures: scores must win by 20%
def test_attention_mode_takes_a_path_only_where_it_is_clearly_faster(monkeypatch, bf16_ms, fp32_ms, scores_ms, expect):
    """A near tie (an AMX host's flash timings, which moved either side of each other with the load, and flipped
    the run's numerics) takes fp32 flash; flash in bf16 must beat it by 20%, and the scores path must beat the
    flash chosen by 20%. Where a call's scores do not fit, the flash choice stands."""
    monkeypatch.setenv("SFTFUSE_CPU_GEMM", "auto")
    monkeypatch.delenv("SFTFUSE_CPU_ATTENTION", raising=False)
    monkeypatch.setattr(_cpu, "attention_times", lambda dtype: (bf16_ms / 1e3, fp32_ms / 1e3, scores_ms / 1e3))
    assert _cpu.attention_mode(torch.bfloat16) == expect
    flash = _cpu.attention_mode(torch.bfloat16, scores_ok=False)
    assert flash == ("native" if bf16_ms < 0.8 * fp32_ms else "fp32")
    assert _cpu.attention_mode(torch.float32) == "native"


def test_attention_override(monkeypatch):
    """SFTFUSE_CPU_ATTENTION forces a mode (scores where the call allows it, else fp32 flash) ahead of
    SFTFUSE_CPU_GEMM; a bad value is an error that names the variable."""
    monkeypatch.setenv("SFTFUSE_CPU_GEMM", "native")
    monkeypatch.setattr(_cpu, "attention_times", lambda dtype: pytest.fail("measured although forced"))
    for mode in _cpu.ATTENTION_MODES:
        monkeypatch.setenv("SFTFUSE_CPU_ATTENTION", mode)
        assert _cpu.attention_mode(torch.bfloat16) == mode
    assert _cpu.attention_mode(torch.bfloat16, scores_ok=False) == "fp32"
    monkeypatch.setenv("SFTFUSE_CPU_ATTENTION", "flash")
    with pytest.raises(ValueError, match="SFTFUSE_CPU_ATTENTION"):
        _cpu.attention_mode(torch.bfloat16)


_XEON = "vendor_id : GenuineIntel flags : fpu avx512f avx512_bf16 amx_bf16 amx_tile"
_EPYC = "vendor_id : AuthenticAMD cpu family : 26 model : 2 flags : fpu avx512f avx512_bf16"
_ZEN4 = "vendor_id : AuthenticAMD cpu family : 25 model : 17 flags : fpu avx512f avx512_bf16"


@pytest.mark.parametrize("cpu,cap,kind", [
    (_XEON, "", "Intel AMX-BF16"), (_XEON, "ALL", "Intel AMX-BF16"), (_XEON, "AVX512_CORE_AMX", "Intel AMX-BF16"),
    (_XEON, "AVX512_CORE_BF16", "Intel AVX512-BF16 (no AMX), capped by ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16"),
    (_XEON, "avx512_core", "Intel AVX512 (no bf16), capped by ONEDNN_MAX_CPU_ISA=AVX512_CORE"),
    (_EPYC, "", "AMD Zen 5 AVX512-BF16"), (_ZEN4, "", "AMD Zen 4 AVX512-BF16"),
    (_EPYC, "AVX512_CORE", "AMD Zen 5 AVX512 (no bf16), capped by ONEDNN_MAX_CPU_ISA"),
    ("flags : fpu avx2", "", "CPU no AVX512")])
def test_cpu_kind_names_the_vendor_and_follows_the_onednn_cap(monkeypatch, cpu, cap, kind):
    """Each kind of this project's hosts by name (an AMD EPYC was once reported as an Intel 'no AMX' one), and
    the kind an ONEDNN_MAX_CPU_ISA cap makes of it; an AMD one names its Zen generation (bf16 GEMMs 2.5x fp32's
    on a Zen 4, 4-8x on a Zen 5)."""
    monkeypatch.setattr(_cpu.Path, "read_text", lambda self: cpu)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert _cpu.cpu_kind().startswith(kind)
