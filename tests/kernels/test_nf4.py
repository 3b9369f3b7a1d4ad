"""NF4: byte-exact agreement with bitsandbytes, round-trip error, and nf4_matmul on both paths vs fp64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sftfuse.kernels.nf4 import (
    NF4_CODE,
    NF4Weight,
    dequantize_nf4,
    dynamic_map,
    nf4_matmul_bwd,
    nf4_matmul_fwd,
    nf4_matmul_ref,
    quantize_nf4,
)
from sftfuse.ops.nf4 import nf4_matmul
from tests.helpers import assert_close, randn

try:
    import bitsandbytes.functional as bnbF
except Exception:  # noqa: BLE001 - any failure to import the optional oracle means: skip
    bnbF = None

needs_bnb = pytest.mark.skipif(bnbF is None, reason="bitsandbytes (optional test dependency) is not installed")


def _bnb_native_cpu() -> bool:
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

    return not isinstance(lib, ErrorHandlerMockBNBNativeLibrary)


# Shapes: numel odd (7x13, 1x1: half-filled last byte) and not a multiple of 64 (300x301, 5x37: partial last
# block, blocks straddling rows); over 256 blocks (300x301, 576x576: several nested scale groups); SmolLM2's
# 192x576 (exact blocks). Weight scales from 1e-3 to 1e2 exercise the nested offset.
FORMAT_SHAPES = [(1, 1), (7, 13), (5, 37), (300, 301), (192, 576), (576, 576)]


@needs_bnb
def test_code_books_match_bitsandbytes():
    assert torch.equal(dynamic_map(), bnbF.create_dynamic_map(signed=True))
    assert torch.equal(torch.tensor(NF4_CODE), bnbF.get_4bit_type("nf4", device="cpu"))


@needs_bnb
@pytest.mark.parametrize("shape", FORMAT_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [True, False])
def test_bytes_match_bitsandbytes(shape, dtype, double_quant):
    scale = 10 ** float(torch.empty(1).uniform_(-3, 2))
    w = randn(*shape, scale=scale).to(dtype)
    ref_packed, st = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    q = quantize_nf4(w, blocksize=64, double_quant=double_quant)
    assert q.packed.shape == ((w.numel() + 1) // 2,) and ref_packed.shape == (q.packed.numel(), 1)
    assert torch.equal(q.packed, ref_packed.view(-1))
    if double_quant:
        assert q.offset == st.offset.item()
        assert torch.equal(q.nested_absmax, st.state2.absmax)
        assert torch.equal(q.nested_code, st.state2.code)
        if _bnb_native_cpu():  # our nested rounding is that of bitsandbytes' native CPU library
            assert torch.equal(q.absmax, st.absmax)
        else:  # its pure-PyTorch fallback rounds to nearest: at most one code step apart
            assert (q.absmax.int() - st.absmax.int()).abs().max() <= 1
    else:
        assert torch.equal(q.absmax, st.absmax)
    # each side dequantizes the other's output identically
    assert torch.equal(dequantize_nf4(q, dtype), bnbF.dequantize_4bit(ref_packed, st))
    theirs = NF4Weight(ref_packed.view(-1), st.absmax, st.state2.absmax if double_quant else None,
                       st.state2.code if double_quant else None, st.offset.item() if double_quant else 0.0,
                       st.code, 64, shape, dtype)
    assert torch.equal(dequantize_nf4(theirs, dtype), bnbF.dequantize_4bit(ref_packed, st))


@needs_bnb
@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_other_blocksizes_match_bitsandbytes(blocksize):
    w = randn(33, 129)  # 4257 values: partial blocks at every block size
    ref_packed, st = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    q = quantize_nf4(w, blocksize=blocksize)
    assert torch.equal(q.packed, ref_packed.view(-1)) and torch.equal(q.absmax, st.absmax)
    assert torch.equal(dequantize_nf4(q, torch.float32), bnbF.dequantize_4bit(ref_packed, st))


@pytest.mark.parametrize("shape", [(7, 13), (300, 301), (64, 1000)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_error_bound(shape, double_quant):
    """|w - dequant(quant(w))| <= half the largest code gap times the block's absmax (+ the nested error)."""
    w = randn(*shape, scale=0.02)
    q = quantize_nf4(w, double_quant=double_quant)
    deq = dequantize_nf4(q, torch.float32).view(-1)
    flat = w.view(-1)
    n, bs = flat.numel(), q.blocksize
    pad = (-n) % bs
    absmax = F.pad(flat.abs(), (0, pad)).view(-1, bs).amax(1)
    scales = q.scales()
    code = torch.tensor(NF4_CODE)
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    # the decoded scale differs from the true absmax by the nested error; a code is at most 1 in magnitude
    bound = (half_gap * absmax + (scales - absmax).abs() + 1e-7).repeat_interleave(bs)[:n]
    assert ((deq - flat).abs() <= bound).all()
    if not double_quant:
        assert torch.equal(scales, absmax)
    else:  # nested error: below half a dynamic-map step (<= 1/64 near 1) of the group's largest |absmax - mean|
        assert float((scales - absmax).abs().max()) <= float((absmax - absmax.mean()).abs().max()) / 64 + 1e-9


def test_bad_inputs():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(randn(4, 64), blocksize=48)
    with pytest.raises(TypeError, match="weight"):
        quantize_nf4(randn(64))
    q = quantize_nf4(randn(8, 64))
    with pytest.raises(ValueError, match="x"):
        nf4_matmul_fwd(randn(3, 65), q)
    with pytest.raises(ValueError, match="dy"):
        nf4_matmul_bwd(randn(3, 64), q)
    with pytest.raises(TypeError, match="q"):
        nf4_matmul(randn(3, 64), randn(8, 64))


# Matmul cases: (tokens, in, out, double_quant). 1 and 5 tokens take the small-M kernel config, 37 and 130 the
# large one; in = 64 and 576 are multiples of the blocksize (the kernels' one-scale-per-row ALIGNED path), 129
# and 1000 are not (blocks straddle rows; 129 is odd, so rows start mid-byte); out sizes are no multiple of any
# tile except SmolLM2's 192; each path meets both scale formats. The Triton path runs in the interpreter.
MATMUL_SHAPES = [(1, 64, 96, False), (37, 129, 99, True), (5, 1000, 67, False), (130, 576, 192, True)]


@pytest.mark.parametrize("shape", MATMUL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_nf4_matmul_fwd_bwd(backend, shape, dtype, with_bias):
    """Forward and backward vs fp64 on the dequantized weight. bf16: the kernels upcast to fp32 under the
    interpreter, so the bound is PyTorch's own bf16 F.linear error (a bf16 GEMM on the bf16-rounded weight)."""
    m, k, n, double_quant = shape
    q = quantize_nf4(randn(n, k), double_quant=double_quant)
    x = randn(m, k, dtype=dtype, requires_grad=True)
    bias = randn(n, dtype=dtype, requires_grad=True) if with_bias else None
    y = nf4_matmul(x, q, bias)
    dy = randn(m, n, dtype=dtype)
    grads = torch.autograd.grad(y, [x] + ([bias] if with_bias else []), dy)

    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if with_bias else None
    y64 = nf4_matmul_ref(x64, q, b64)
    y64_val = y64.detach()
    ref_grads = torch.autograd.grad(y64, [x64] + ([b64] if with_bias else []), dy.double())

    w_lp = dequantize_nf4(q, dtype)
    xb = x.detach().requires_grad_()
    bb = bias.detach().requires_grad_() if with_bias else None
    y_lp = F.linear(xb, w_lp, bb)
    base_grads = torch.autograd.grad(y_lp, [xb] + ([bb] if with_bias else []), dy)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close(y, y64_val, baseline=y_lp if dtype != torch.float32 else None, name="y")
    for g, r, b, name in zip(grads, ref_grads, base_grads, ["dx", "dbias"]):
        assert_close(g, r, baseline=b if dtype != torch.float32 else None, name=name)


def test_nf4_matmul_batched_input(backend):
    q = quantize_nf4(randn(40, 96))
    x = randn(2, 3, 96)
    y = nf4_matmul(x, q)
    assert y.shape == (2, 3, 40)
    assert_close(y, nf4_matmul_ref(x.view(6, 96), q).view(2, 3, 40))


def test_launchers_write_every_output(backend):
    """The non-autograd launchers: every output element finite and right (odd sizes, partial tiles)."""
    q = quantize_nf4(randn(70, 130))
    x, dy = randn(9, 130), randn(9, 70)
    y, dx = nf4_matmul_fwd(x, q), nf4_matmul_bwd(dy, q)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert_close(y, nf4_matmul_ref(x, q))
    assert_close(dx, dy.double() @ dequantize_nf4(q, torch.float32).double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_paths_agree(backend, dtype):
    """The Triton dequantize kernel (interpreter) gives the PyTorch path's bytes exactly."""
    import os

    q = quantize_nf4(randn(37, 129, scale=3.0))
    out = dequantize_nf4(q, dtype)
    os.environ["SFTFUSE_BACKEND"] = "torch"
    ref = dequantize_nf4(q, dtype)
    assert out.dtype == dtype and torch.equal(out, ref)


@pytest.mark.parametrize("gemm", ["native", "fp32"])
def test_cpu_tiles_bound_the_16bit_buffer(monkeypatch, gemm):
    """With a small tile budget the CPU path decodes several row tiles and still matches, with bf16 GEMMs
    (bit-equal to F.linear on the dequantized weight) and with fp32 GEMMs on bf16 inputs (SFTFUSE_CPU_GEMM)."""
    from sftfuse.kernels import nf4

    monkeypatch.setenv("SFTFUSE_BACKEND", "torch")
    monkeypatch.setenv("SFTFUSE_CPU_GEMM", gemm)
    monkeypatch.setattr(nf4, "TILE_ELEMS", 64 * 129 * 2)  # 2 row steps of 64 rows (129 is odd: 64-row steps)
    q = quantize_nf4(randn(300, 129))
    tiles = nf4._row_tiles(q)
    assert len(tiles) == 3 and all(r0 * 129 % 64 == 0 for r0, _ in tiles)
    x, dy = randn(11, 129, dtype=torch.bfloat16), randn(11, 300, dtype=torch.bfloat16)
    bias = randn(300, dtype=torch.bfloat16)
    w = dequantize_nf4(q, torch.bfloat16)
    y, dx = nf4_matmul_fwd(x, q, bias), nf4_matmul_bwd(dy, q)
    assert y.dtype == dx.dtype == torch.bfloat16
    if gemm == "native":
        assert torch.equal(y, F.linear(x, w, bias))
    ref_y = F.linear(x.double(), dequantize_nf4(q, torch.float32).double(), bias.double())
    assert_close(y, ref_y, baseline=F.linear(x, w, bias))
    assert_close(dx, dy.double() @ w.double(), baseline=dy @ w)


def test_large_token_route(backend, monkeypatch):
    """Above FUSED_MAX_TOKENS the Triton launcher dequantizes and calls the library GEMM: same results."""
    if backend == "triton":
        from sftfuse.kernels import nf4_launch

        monkeypatch.setattr(nf4_launch, "FUSED_MAX_TOKENS", 8)
    q = quantize_nf4(randn(33, 129))
    x, dy = randn(20, 129), randn(20, 33)
    assert_close(nf4_matmul_fwd(x, q), nf4_matmul_ref(x, q))
    assert_close(nf4_matmul_bwd(dy, q), dy.double() @ dequantize_nf4(q, torch.float32).double())
