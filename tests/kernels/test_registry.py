"""Backend dispatch, the registries, warn-once, and the comparison helpers every op test relies on."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sftfuse.kernels import _registry
from sftfuse.kernels._registry import max_error, tolerance, use_triton, warn_once
from tests.helpers import assert_close, poison

ROOT = Path(__file__).resolve().parents[2]


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


def test_warn_once_warns_once_per_reason(monkeypatch):
    monkeypatch.setattr(_registry, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            warn_once("a", "first reason")
        warn_once("b", "second reason")
    assert [str(w.message) for w in caught] == ["first reason", "second reason"]


def test_every_op_registers_its_kernels_and_its_check():
    """The Triton files register the kernels, the op files the numerics checks; the tools register nothing."""
    _registry.import_kernel_modules()
    assert {"nf4", "lora", "cross_entropy"} <= set(_registry.registered_kernels())
    assert {"nf4_matmul", "lora", "cross_entropy"} <= set(_registry.registered_checks())


_TORCH_PATH_RUN = """
import sys, torch
from sftfuse.kernels.nf4 import quantize_nf4
from sftfuse.ops.cross_entropy import linear_cross_entropy
from sftfuse.ops.lora import lora_linear
from sftfuse.ops.lora_mlp import lora_mlp
from sftfuse.ops.nf4 import nf4_matmul
h, w = torch.randn(5, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
linear_cross_entropy(h, w, torch.randint(0, 40, (5,))).backward()
q = quantize_nf4(torch.randn(24, 16))
A, B = torch.randn(4, 16, requires_grad=True), torch.randn(24, 4, requires_grad=True)
(nf4_matmul(h, q) + lora_linear(h, q, A, B, 2.0, dropout=0.1)).sum().backward()
proj = lambda o, i: (torch.randn(o, i), torch.randn(4, i, requires_grad=True), torch.randn(o, 4), 2.0, 0.0)
lora_mlp(h, proj(24, 16), proj(24, 16), proj(16, 24)).sum().backward()
assert "triton" not in sys.modules, "the PyTorch path imported triton"
"""


def test_pytorch_path_never_imports_triton():
    """Each op file imports its Triton file on first use of the Triton path only (a fresh process: this one has
    Triton loaded already)."""
    env = {**os.environ, "SFTFUSE_BACKEND": "torch", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", _TORCH_PATH_RUN], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=300)
    assert p.returncode == 0, p.stderr
