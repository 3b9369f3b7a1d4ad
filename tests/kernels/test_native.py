"""The native NF4 decode (sftfuse/kernels/nf4_decode.c): bit-equal to the torch-ops decode it replaces, on every
format variant and tile start, on one thread and several; its build cached per CPU, and a missing compiler
falling back to torch ops with one warning."""

from __future__ import annotations

import math
import shutil
import warnings

import pytest
import torch

from sftfuse.kernels import _native, nf4
from sftfuse.kernels.nf4 import quantize_nf4
from tests.helpers import randn

needs_native = pytest.mark.skipif(_native.nf4_decode_native() is None, reason="no C compiler: the native build is off")


def _decode_both(monkeypatch, q, r0, r1, dtype, scales):
    """Rows [r0, r1) decoded natively and by torch ops (SFTFUSE_NATIVE=off), each into a poisoned buffer."""
    outs = []
    for choice in ("auto", "off"):
        monkeypatch.setenv("SFTFUSE_NATIVE", choice)
        n = (r1 - r0) * q.shape[1]
        out = torch.full((n,), float("nan"), dtype=dtype)
        outs.append(nf4._decode_flat(q, r0 * q.shape[1], r1 * q.shape[1], scales, out))
    return outs


# Shapes: odd numel (7x13: a half-filled last byte; 1x1), partial last blocks (5x37, 300x301), several nested
# scale groups (300x301, 576x576), SmolLM2's 1536x576 (whole 64-blocks, chunks for several threads), and a
# 4096-wide row (a Llama width) at block sizes 32 to 4096.
@needs_native
@pytest.mark.parametrize("shape,blocksize", [((1, 1), 64), ((7, 13), 64), ((5, 37), 32), ((300, 301), 64),
                                             ((576, 576), 128), ((1536, 576), 64), ((33, 4096), 4096)])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_decode_is_bit_equal_to_torch_ops(monkeypatch, shape, blocksize, double_quant, dtype, threads):
    """Whole weights and a row tile starting mid-weight (on a block), with the scales passed in or (double
    quantization) decoded natively; values range over 1e-3..1e2 so that both roundings see every exponent."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q = quantize_nf4(randn(*shape, scale=10 ** float(torch.empty(1).uniform_(-3, 2))), blocksize=blocksize,
                         double_quant=double_quant)
        rows = shape[0]
        step = blocksize // math.gcd(shape[1], blocksize)  # rows per block-aligned step
        starts = [0] + ([step] if rows > step else [])
        for r0 in starts:
            for scales in (None, q.scales()):
                ours, ref = _decode_both(monkeypatch, q, r0, rows, dtype, scales)
                assert torch.equal(ours.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                                   ref.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), (r0, scales)
    finally:
        torch.set_num_threads(old)


@needs_native
def test_native_matmul_equals_the_torch_ops_path(monkeypatch):
    """nf4_matmul forward and backward give the same bits with either decode (bf16 GEMMs on the same weight)."""
    monkeypatch.setenv("SFTFUSE_BACKEND", "torch")
    monkeypatch.setenv("SFTFUSE_CPU_GEMM", "native")
    q = quantize_nf4(randn(192, 576))
    x, dy = randn(37, 576, dtype=torch.bfloat16), randn(37, 192, dtype=torch.bfloat16)
    got = {}
    for choice in ("auto", "off"):
        monkeypatch.setenv("SFTFUSE_NATIVE", choice)
        got[choice] = (nf4.nf4_matmul_fwd(x, q), nf4.nf4_matmul_bwd(dy, q))
    assert all(torch.equal(a, b) for a, b in zip(got["auto"], got["off"], strict=True))


@needs_native
def test_build_is_cached_and_keyed_by_the_cpu(monkeypatch, tmp_path):
    """One build per (source, compiler, CPU flags): a second call finds the file; another CPU's flags name
    another file (a cache shared by two kinds of CPU never loads the other's -march=native build)."""
    monkeypatch.setenv("SFTFUSE_CACHE_DIR", str(tmp_path / "cache"))
    cc = shutil.which("cc") or shutil.which("gcc")
    first = _native._build(cc)
    assert first.exists() and first.parent == tmp_path / "cache"
    mtime = first.stat().st_mtime_ns
    assert _native._build(cc) == first and first.stat().st_mtime_ns == mtime
    monkeypatch.setattr(_native, "_cpu_flags", lambda: "flags : fpu sse2")
    other = _native._build(cc)
    assert other != first and other.exists()
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".so")] == []  # no temp left


def test_missing_compiler_falls_back_with_one_warning(monkeypatch, tmp_path):
    """No compiler: one warning naming the cause, then torch ops decode (the same values as ever)."""
    monkeypatch.setenv("SFTFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("SFTFUSE_NATIVE", "auto")
    from sftfuse.kernels import _registry

    monkeypatch.setattr(_registry, "_WARNED", set())
    _native._library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _native.nf4_decode_native() is None and _native.nf4_decode_native() is None
            q = quantize_nf4(randn(5, 37))
            got = nf4.dequantize_nf4(q, torch.float32)
        msgs = [str(w.message) for w in caught if "native build" in str(w.message)]
        assert len(msgs) == 1 and "no-such-cc" in msgs[0]
        assert "no native build" in _native.describe()
        monkeypatch.setenv("SFTFUSE_NATIVE", "off")
        assert torch.equal(got, nf4.dequantize_nf4(q, torch.float32))
    finally:
        _native._library.cache_clear()


def test_native_switch_is_checked(monkeypatch):
    monkeypatch.setenv("SFTFUSE_NATIVE", "maybe")
    with pytest.raises(ValueError, match="SFTFUSE_NATIVE"):
        _native.nf4_decode_native()
