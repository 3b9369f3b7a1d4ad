"""The fused gated LoRA MLP, the RMSNorm and the fp32 CPU attention: against fp64 references, what they save.

Shapes are odd (tokens 37, hidden 70, intermediate 99, r 8) so no size is a multiple of a block; the LoRA
launchers inside run on both paths (the Triton one in the interpreter).
"""

from __future__ import annotations

import pytest
import torch

from sftfuse.kernels.gated_mlp import act_fwd
from sftfuse.kernels.lora import keep_mask, lora_linear_ref, new_seed
from sftfuse.kernels.rms_norm import rms_norm_ref
from sftfuse.ops.attention import scaled_dot_product_attention
from sftfuse.ops.lora_mlp import lora_mlp
from sftfuse.ops.rms_norm import rms_norm
from tests.helpers import assert_close, randn

M, H, FF, R = 37, 70, 99, 8


def _proj(k, n, dtype, nf4=False):
    from sftfuse.kernels.nf4 import _dequantize_torch, quantize_nf4

    w = randn(n, k, dtype=dtype, scale=k**-0.5)
    A = randn(R, k, dtype=dtype, scale=k**-0.5, requires_grad=True)
    B = randn(n, R, dtype=dtype, scale=R**-0.5, requires_grad=True)
    if nf4:
        q = quantize_nf4(w)
        return q, _dequantize_torch(q, dtype), A, B
    return w, w, A, B


def _ref(x, projs, keeps, p, act, upcast):
    """Unfused block: three lora_linear_ref with the masks the fused op must have drawn."""
    dt = torch.float64 if upcast else x.dtype

    def lin(i, inp):
        _, W, A, B = projs[i]
        return lora_linear_ref(inp, W, A, B, 2.0, keep=keeps[i], p=p, upcast=upcast)

    g, u = lin(0, x), lin(1, x)
    h = (act_fwd(g.to(torch.float64 if upcast else torch.float32), act) * u).to(dt)
    return lin(2, h)


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "save"])
@pytest.mark.parametrize("act,p,nf4", [("silu", 0.0, False), ("gelu_tanh", 0.2, False), ("silu", 0.1, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_mlp_matches_fp64(backend, dtype, act, p, nf4, recompute):
    projs = [_proj(H, FF, dtype, nf4), _proj(H, FF, dtype, nf4), _proj(FF, H, dtype, nf4)]
    x = randn(3, M, H, dtype=dtype, requires_grad=True)
    dy = randn(3, M, H, dtype=dtype)
    torch.manual_seed(77)
    y = lora_mlp(x, *[(b, A, B, 2.0, p) for b, _, A, B in projs], act=act, recompute=recompute)
    torch.manual_seed(77)
    seeds = [new_seed() if p > 0 else 0 for _ in range(3)]
    keeps = [keep_mask(torch.empty(3 * M, k), s, p, R) for s, k in zip(seeds, (H, H, FF))]
    leaves = [x] + [t for _, _, A, B in projs for t in (A, B)]
    grads = torch.autograd.grad(y, leaves, dy)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    projs64 = [(None, W, leaves64[1 + 2 * i], leaves64[2 + 2 * i]) for i, (_, W, _, _) in enumerate(projs)]
    y64 = _ref(leaves64[0].view(-1, H), projs64, keeps, p, act, upcast=True).view(3, M, H)
    g64 = torch.autograd.grad(y64, leaves64, dy.double())
    base = None
    if dtype != torch.float32:  # PyTorch's unfused block in bf16 bounds our error
        lb = [t.detach().requires_grad_() for t in leaves]
        projs_b = [(None, W, lb[1 + 2 * i], lb[2 + 2 * i]) for i, (_, W, _, _) in enumerate(projs)]
        yb = _ref(lb[0].view(-1, H), projs_b, keeps, p, act, upcast=False).view(3, M, H)
        base = [yb, *torch.autograd.grad(yb, lb, dy)]
    names = ["y", "dx", "dA_gate", "dB_gate", "dA_up", "dB_up", "dA_down", "dB_down"]
    for i, (name, ours, ref) in enumerate(zip(names, (y, *grads), (y64, *g64), strict=True)):
        assert ours.dtype == dtype and ours.shape == ref.shape
        assert_close(ours.detach(), ref.detach(), baseline=None if base is None else base[i].detach(), name=name)


@pytest.mark.parametrize("recompute", [True, False])
def test_lora_mlp_saves_no_intermediate_activation_when_recomputing(recompute):
    projs = [_proj(H, FF, torch.bfloat16), _proj(H, FF, torch.bfloat16), _proj(FF, H, torch.bfloat16)]
    x = randn(M, H, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_mlp(x, *[(b, A, B, 2.0, 0.0) for b, _, A, B in projs], recompute=recompute)
    wide = [t for t in saved if t.dim() == 2 and t.shape == (M, FF)]
    assert len(wide) == (0 if recompute else 2)  # gate's and up's outputs, only when not recomputing
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # x itself, not a copy


def test_lora_mlp_refuses_bad_shapes():
    projs = [_proj(H, FF, torch.float32), _proj(H, FF, torch.float32), _proj(FF, H, torch.float32)]
    parts = [(b, A, B, 2.0, 0.0) for b, _, A, B in projs]
    with pytest.raises(ValueError, match="chain"):
        lora_mlp(randn(4, H + 1), *parts)
    with pytest.raises(ValueError, match="act"):
        lora_mlp(randn(4, H), *parts, act="relu")
    with pytest.raises(ValueError, match="up"):
        lora_mlp(randn(4, H), parts[0], (parts[1][0], parts[1][1][:, :5], *parts[1][2:]), parts[2])


@pytest.mark.parametrize("rule", ["weight", "one_plus"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (3, 37, 100)], ids=["1x64", "3x37x100"])
def test_rms_norm_matches_hf_and_fp64(backend, rule, dtype, shape):
    """PyTorch path: HF's forward bit for bit. Triton path (its own summation order): within HF's own error."""
    x = randn(*shape, dtype=dtype, scale=3.0, requires_grad=True)
    w = randn(shape[-1], dtype=dtype, scale=0.5, requires_grad=True)
    dy = randn(*shape, dtype=dtype)
    y = rms_norm(x, w, 1e-6, rule)
    hf = rms_norm_ref(x, w, 1e-6, rule)  # HF's module, written out
    assert y.dtype == hf.dtype
    if backend == "torch":
        assert torch.equal(y, hf)  # the same forward, bit for bit
    else:
        y64 = rms_norm_ref(x.detach().double(), w.detach().double(), 1e-6, rule, upcast=True)
        assert_close(y.detach(), y64, baseline=hf.detach() if dtype != torch.float32 else None, name="y")
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    dx64, dw64 = torch.autograd.grad(rms_norm_ref(x64, w64, 1e-6, rule, upcast=True), (x64, w64), dy.double())
    bdx, bdw = torch.autograd.grad(hf, (x, w), dy)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    assert_close(dx, dx64, baseline=bdx if dtype != torch.float32 else None, name="dx")
    assert_close(dw, dw64, baseline=bdw if dtype != torch.float32 else None, name="dw")


def test_rms_norm_saves_its_input_and_a_row_scale_only():
    x = randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    w = randn(64, dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(x, w, 1e-6)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16  # x itself; HF's module keeps an fp32 copy too
    assert sum(t.numel() for t in saved if t is not big[0] and t.data_ptr() != w.data_ptr()) == 5  # r per row


# attention: (batch 2, 6 query heads, 37 tokens, head_dim 24); GQA cases have 3 key/value heads
_ATTN_CASES = {
    "causal_gqa": dict(kv_heads=3, is_causal=True, enable_gqa=True),
    "bool_mask": dict(kv_heads=6, mask="bool"),
    "float_mask": dict(kv_heads=6, mask="float", scale=0.3),
}


def _attn_inputs(dtype, kv_heads, mask=None, **opts):
    q = randn(2, 6, 37, 24, dtype=dtype, requires_grad=True)
    k, v = (randn(2, kv_heads, 37, 24, dtype=dtype, requires_grad=True) for _ in range(2))
    if mask == "bool":  # padding-like: random holes, the diagonal always kept (no fully masked row)
        opts["attn_mask"] = (torch.rand(2, 1, 37, 37) > 0.3) | torch.eye(37, dtype=torch.bool)
    elif mask == "float":  # an additive bias with dtype-min holes, as HF builds them
        bias = randn(2, 1, 37, 37, scale=0.5)
        holes = (torch.rand(2, 1, 37, 37) < 0.3) & ~torch.eye(37, dtype=torch.bool)
        opts["attn_mask"] = bias.masked_fill(holes, torch.finfo(dtype).min).to(dtype)
    return (q, k, v), opts


@pytest.mark.parametrize("gemm", ["fp32", "native"])
@pytest.mark.parametrize("case", list(_ATTN_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_fp64(dtype, case, gemm, monkeypatch):
    monkeypatch.setenv("SFTFUSE_CPU_GEMM", gemm)
    (q, k, v), opts = _attn_inputs(dtype, **_ATTN_CASES[case])
    dy = randn(2, 6, 37, 24, dtype=dtype)
    y = scaled_dot_product_attention(q, k, v, **opts)
    grads = torch.autograd.grad(y, (q, k, v), dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    opts64 = {**opts, "attn_mask": opts["attn_mask"].double()} if case == "float_mask" else opts
    y64 = torch.nn.functional.scaled_dot_product_attention(*leaves64, **opts64)
    g64 = torch.autograd.grad(y64, leaves64, dy.double())
    yt = torch.nn.functional.scaled_dot_product_attention(q, k, v, **opts)  # torch's own, in dtype
    base = [yt, *torch.autograd.grad(yt, (q, k, v), dy)]
    if gemm == "native" or dtype == torch.float32:  # nothing to widen: torch's function, unchanged
        assert all(torch.equal(a, b) for a, b in zip((y, *grads), base, strict=True))
    for name, ours, ref, b in zip(("y", "dq", "dk", "dv"), (y, *grads), (y64, *g64), base, strict=True):
        assert ours.dtype == dtype and ours.shape == ref.shape
        assert_close(ours.detach(), ref.detach(), baseline=b.detach() if dtype != torch.float32 else None, name=name)


def test_attention_saves_its_16bit_inputs_and_the_output(monkeypatch):
    """Kept for the backward: q, k, v as given, the fp32 output and its log-sum-exp; no fp32 copy of an input."""
    monkeypatch.setenv("SFTFUSE_CPU_GEMM", "fp32")
    (q, k, v), opts = _attn_inputs(torch.bfloat16, **_ATTN_CASES["causal_gqa"])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = scaled_dot_product_attention(q, k, v, **opts)
    assert y.dtype == torch.bfloat16
    inputs = [t for t in saved if t.dtype == torch.bfloat16]
    assert sorted(t.data_ptr() for t in inputs) == sorted(t.data_ptr() for t in (q, k, v))
    assert sorted(tuple(t.shape) for t in saved if t.dtype == torch.float32) == [(2, 6, 37), (2, 6, 37, 24)]


def test_attention_falls_back_where_torch_decides(monkeypatch):
    """Fewer key/value heads without enable_gqa: torch's function, and its error. A torch build without the CPU
    flash kernel's ops: torch's function, unchanged."""
    from sftfuse.ops import attention as blocks

    monkeypatch.setenv("SFTFUSE_CPU_GEMM", "fp32")
    (q, k, v), opts = _attn_inputs(torch.bfloat16, **_ATTN_CASES["causal_gqa"])
    with pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError):
        scaled_dot_product_attention(q, k, v)
    ours = scaled_dot_product_attention(q, k, v, **opts)
    monkeypatch.setattr(blocks, "_HAS_FLASH_CPU", False)
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, **opts)
    assert not torch.equal(ours, theirs)  # fp32 once rounded vs bf16 throughout
    assert torch.equal(scaled_dot_product_attention(q, k, v, **opts), theirs)


def test_attention_with_dropout_is_torchs(monkeypatch):
    """Dropout would draw a second mask in the recomputed forward: that case runs torch's function."""
    monkeypatch.setenv("SFTFUSE_CPU_GEMM", "fp32")
    (q, k, v), opts = _attn_inputs(torch.bfloat16, **_ATTN_CASES["causal_gqa"])
    torch.manual_seed(5)
    y = scaled_dot_product_attention(q, k, v, dropout_p=0.3, **opts)
    torch.manual_seed(5)
    assert torch.equal(y, torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.3, **opts))
