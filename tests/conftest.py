"""Test harness: Triton interpreter without a GPU, the backend switch, a fresh seed per test (helpers: helpers.py).

`TRITON_INTERPRET=1` must be set before anything imports Triton, so it is set here, at the top of the first
file pytest loads, when no CUDA device is present.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

from tests.helpers import DEVICE  # noqa: E402


@pytest.fixture(autouse=True)
def seed(request):
    """A fresh seed per test (derived from its name): reproducible, and never the same inputs twice."""
    s = abs(hash(request.node.nodeid)) % (2**31)
    torch.manual_seed(s)
    return s


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run the test once on each path: the PyTorch path, and the Triton path (the interpreter on CPU)."""
    monkeypatch.setenv("SFTFUSE_BACKEND", request.param)
    return request.param


@pytest.fixture
def device():
    return DEVICE
