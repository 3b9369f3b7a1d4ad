"""Backend dispatch and the comparison helpers every op test relies on."""

import pytest
import torch

from sftfuse.kernels._registry import max_error, tolerance, use_triton
from tests.helpers import assert_close, poison


def test_dispatch_follows_device_and_override(monkeypatch):
    x = torch.randn(3)
    monkeypatch.delenv("SFTFUSE_BACKEND", raising=False)
    assert use_triton(x) is False  # a CPU tensor takes the PyTorch path by default
    monkeypatch.setenv("SFTFUSE_BACKEND", "torch")
    assert use_triton(x) is False
    monkeypatch.setenv("SFTFUSE_BACKEND", "triton")
    assert use_triton(x) is True  # the conftest put Triton in interpreter mode on this CPU machine
    monkeypatch.setenv("SFTFUSE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SFTFUSE_BACKEND='cuda'"):
        use_triton(x)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("SFTFUSE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        use_triton(torch.randn(2))


def test_assert_close_catches_error_nan_and_inf():
    ref = torch.randn(50, dtype=torch.float64)
    assert_close(ref.float(), ref)
    with pytest.raises(AssertionError, match="max error"):
        assert_close((ref + 1e-3).float(), ref)
    bad = ref.clone()
    bad[7] = float("nan")
    assert max_error(bad, ref) == float("inf")
    with pytest.raises(AssertionError):
        assert_close(bad.float(), ref)
    inf_ref = ref.clone()
    inf_ref[3] = float("inf")
    flipped = inf_ref.clone()
    flipped[3] = -float("inf")
    assert max_error(inf_ref, inf_ref) == 0.0 and max_error(flipped, inf_ref) == float("inf")


def test_baseline_widens_tolerance_by_twice_torch_error():
    ref = torch.randn(100, dtype=torch.float64)
    baseline = ref.bfloat16()
    base_err = max_error(baseline, ref)
    assert tolerance(ref, torch.bfloat16, base_err) == pytest.approx(tolerance(ref, torch.bfloat16) + 2 * base_err)


def test_poison_fills_nan_and_sentinel():
    assert torch.isnan(poison(torch.empty(4))).all()
    assert (poison(torch.empty(4, dtype=torch.int64)) == -7).all()
