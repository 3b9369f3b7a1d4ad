"""The CUDA (Triton) path's plans and limits: the NF4 route model, LoRA's launch plan, zero tokens in every launcher,
NF4 size checks and the reused dequantize buffer. Launchers run in the interpreter on a CPU-only host."""

from __future__ import annotations

import pytest
import torch

from sftfuse.kernels import lora, nf4, nf4_launch
from sftfuse.kernels.nf4 import NF4Weight, quantize_nf4
from tests.helpers import assert_close, randn


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("SFTFUSE_BACKEND", "triton")


# ---------------------------------------------------------------------------------------------------------------
# Plans (read by sftfuse.kernels.roofline)


def test_nf4_plan_fuses_only_where_weight_bytes_bound_the_gemm():
    """4096 x 4096 on an H100: fused for a decode-sized batch, dequantize + cuBLAS from a few hundred tokens on (the
    issue's estimate: 128-256), and the chosen route is the cheaper one in the plan's own figures."""
    small, large = nf4.plan(16, 4096, 4096, "h100"), nf4.plan(8192, 4096, 4096, "h100")
    assert small["path"] == "fused" and large["path"] == "dequant"
    for pl in (small, large):
        assert pl[pl["path"]]["time_s"] == min(pl["fused"]["time_s"], pl["dequant"]["time_s"])
    cross = next(m for m in range(16, 4097, 16) if nf4.plan(m, 4096, 4096, "h100")["path"] == "dequant")
    assert 64 <= cross <= 512, cross
    assert nf4.plan(16, 4096, 4096, "h100", dtype=torch.float32)["path"] == "dequant"  # no fp32 fused route
    # the fused route never reads more weight bytes than 4-bit plus scales; the dequant route writes 2 bytes back
    assert small["fused"]["bytes"] < small["dequant"]["bytes"]
    # a slower chip with the same shape crosses over earlier or at the same point
    cross_a100 = next(m for m in range(16, 4097, 16) if nf4.plan(m, 4096, 4096, "a100")["path"] == "dequant")
    assert cross_a100 <= cross


@pytest.mark.parametrize("nf4_base", [False, True])
def test_lora_plan_has_no_recomputed_flops(nf4_base):
    """Llama-3-8B's down_proj at 8k tokens, r = 16: the plan's FLOPs are the base GEMMs' plus each rank-r GEMM once
    (the issue's bar: within 1.05x), and every launch is costed."""
    M, N, K, r = 8192, 4096, 14336, 16
    pl = lora.plan(M, N, K, r, "h100", p=0.1, nf4=nf4_base)
    assert pl["flops"] == pl["base_flops"] + pl["adapter_flops"]
    assert pl["flops"] <= 1.05 * (4 * M * N * K + 8 * M * r * (N + K))
    assert all(x["time_s"] > 0 and x["bytes"] > 0 for x in pl["launches"])
    assert pl["nf4_paths"] == (["dequant", "dequant"] if nf4_base else [])
    no_dx = lora.plan(M, N, K, r, "h100", need_dx=False)
    assert no_dx["flops"] < pl["flops"] and not any(x["name"].startswith("dx") for x in no_dx["launches"])


def test_device_props_are_checked():
    with pytest.raises(ValueError, match="device_props"):
        nf4.plan(16, 64, 64, "tpu")
    assert nf4_launch.gpu_props({"tflops": 1.0})["hbm_tbs"] == nf4_launch.GPU["h100"]["hbm_tbs"]


# ---------------------------------------------------------------------------------------------------------------
# Zero tokens: every launcher returns empty outputs (a zero-program grid would fail to launch)


def test_zero_tokens_in_every_launcher(triton_backend):
    from sftfuse.kernels.gated_mlp import gated_bwd, gated_fwd
    from sftfuse.kernels.rms_norm import rms_norm_bwd, rms_norm_fwd

    K, N, r = 64, 48, 8
    x, dy = randn(0, K), randn(0, N)
    A, B, W = randn(r, K), randn(N, r), randn(N, K)
    q = quantize_nf4(randn(N, K))
    for base in (W, q):
        for p in (0.0, 0.1):
            y, t = lora.lora_linear_fwd(x, base, A, B, 2.0, seed=3, p=p)
            assert y.shape == (0, N) and t.shape == (0, r)
            dx, dA, dB = lora.lora_linear_bwd(dy, x, t, base, A, B, 2.0, seed=3, p=p)
            assert dx.shape == (0, K) and torch.equal(dA, torch.zeros_like(A)) and torch.equal(dB, torch.zeros_like(B))
    assert nf4.nf4_matmul_fwd(x, q).shape == (0, N) and nf4.nf4_matmul_bwd(dy, q).shape == (0, K)
    y, rr = rms_norm_fwd(randn(0, 3, K), randn(K), 1e-6, "weight")
    assert y.shape == (0, 3, K) and rr.shape == (0, 3, 1)
    dx, dw = rms_norm_bwd(randn(0, 3, K), randn(0, 3, K), rr, randn(K), "weight", True)
    assert dx.shape == (0, 3, K) and torch.equal(dw, torch.zeros(K))
    g = randn(0, N)
    assert gated_fwd(g, g, "silu").shape == (0, N)
    assert all(t.shape == (0, N) for t in gated_bwd(g, g, g, "gelu_tanh"))


# ---------------------------------------------------------------------------------------------------------------
# NF4 sizes, and the dequantize route's reused buffer


def _bad(q: NF4Weight, **kw) -> NF4Weight:
    from dataclasses import replace

    return replace(q, **kw)


def test_nf4_sizes_are_checked_for_weights_made_elsewhere(triton_backend):
    """An NF4Weight not made by quantize_nf4 (a bitsandbytes view) gets the same checks before any launch."""
    q = quantize_nf4(randn(48, 64))
    x = randn(5, 64)
    with pytest.raises(ValueError, match="packed bytes"):
        nf4.nf4_matmul_fwd(x, _bad(q, packed=q.packed[:-1]))
    with pytest.raises(ValueError, match="block scales"):
        nf4.nf4_matmul_fwd(x, _bad(q, absmax=q.absmax[:-1]))
    with pytest.raises(ValueError, match="2\\^31"):
        nf4_launch.check_weight(_bad(q, shape=(1 << 16, 1 << 15)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_route_reuses_one_buffer_across_weights(triton_backend, monkeypatch, dtype):
    """Forced onto the dequantize + GEMM route, two weights of different sizes used in turn share one buffer and
    each result is right: the buffer is rewritten per call, never read stale."""
    monkeypatch.setattr(nf4_launch, "FUSED_MAX_TOKENS", 0)
    monkeypatch.setattr(nf4_launch, "_BUFFERS", {})
    qa, qb = quantize_nf4(randn(33, 129)), quantize_nf4(randn(70, 64))
    xa, xb = randn(7, 129, dtype=dtype), randn(7, 64, dtype=dtype)
    for q, x in ((qa, xa), (qb, xb), (qa, xa)):
        w = nf4.dequantize_nf4(q, dtype)
        y = nf4.nf4_matmul_fwd(x, q)
        assert_close(y, x.double() @ w.double().T, baseline=x @ w.T if dtype != torch.float32 else None)
    assert len(nf4_launch._BUFFERS) == 1
    (buf,) = nf4_launch._BUFFERS.values()
    assert buf.dtype == dtype and buf.numel() == max(33 * 129, 70 * 64)  # grown once, to the larger weight


def test_rms_norm_rows_wider_than_the_kernel_take_the_pytorch_path(triton_backend):
    """A row wider than one register tile (8192) falls back, warned once, with the PyTorch path's result."""
    import warnings

    from sftfuse.kernels import _registry, rms_norm

    _registry._WARNED.discard("rms_norm.width")
    x, w = randn(2, 8193), randn(8193)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, r = rms_norm.rms_norm_fwd(x, w, 1e-6, "weight")
        rms_norm.rms_norm_fwd(x, w, 1e-6, "weight")
    assert sum("8193" in str(c.message) for c in caught) == 1
    y_ref, r_ref = rms_norm._rms_norm_fwd_torch(x, w, 1e-6, "weight")
    assert torch.equal(y, y_ref) and torch.equal(r, r_ref)


@pytest.mark.parametrize("H", [100, 576, 2048, 8192])
def test_rms_norm_plan_reads_the_launchers_tiles(monkeypatch, H):
    """The plan's row tile is the one the launcher picks on a GPU (config outside the interpreter), so the cost model
    and the kernel cannot drift; the elementwise plans take the cost model's interface."""
    from sftfuse.kernels import gated_mlp, rms_norm, rms_norm_triton

    monkeypatch.setattr(rms_norm_triton, "interpreter_active", lambda: False)
    rows = rms_norm_triton.config(H)["ROWS"]
    progs = max(1, min(-(-8192 // rows), 4 * 132))
    pl = rms_norm.plan(8192, H, dtype=torch.bfloat16, need_dw=True)
    assert pl["launches"][-1]["bytes"] == progs * H * 4 + H * 2
    assert len(rms_norm.plan(8192, H, need_dw=False)["launches"]) == 2
    gated = gated_mlp.plan(8192, 4 * H, dtype=torch.bfloat16)["launches"]
    assert sum(x["bytes"] for x in gated) == 11 * 8192 * 4 * H * 2  # reads + writes: 3 (fwd), 3 (h again), 5 (bwd)


@pytest.mark.parametrize("p", [0.0, 0.05, 0.1, 0.5, 0.999])
def test_the_launchers_dropout_threshold_is_the_masks(p):
    """lora_launch keeps its own copy of the threshold (it must not import lora.py, which imports it): the same."""
    from sftfuse.kernels.lora_launch import dropout_threshold

    assert dropout_threshold(p) == lora.dropout_threshold(p)
