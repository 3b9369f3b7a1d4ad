"""LoRA linear: both paths against the fp64 reference, the dropout mask plan, the module, and PEFT parity.

bf16 on the Triton path: under the interpreter the kernels upcast every load to fp32 and compute in fp32 (the
IS_INTERP switch), so they are compared against the fp64 reference with PyTorch's own bf16 error as baseline.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from sftfuse.kernels.dropout import drop_positions
from sftfuse.kernels.lora import cpu_drop_mask, dropout_mask, keep_mask, lora_linear_ref, new_seed
from sftfuse.modules.linear import LoRALinear
from sftfuse.ops.lora import lora_linear
from tests.helpers import assert_close, randn

# (tokens, in, out, r): odd sizes below every block (37, 29, 23) with r=1; sizes that cross a 32/64 block edge
# with r=8 and r=16 (the default rank); r=64 (the widest R tile); and SmolLM2's k_proj 576->192 at r=16.
SHAPES = [(37, 29, 23, 1), (67, 70, 45, 8), (33, 96, 130, 16), (20, 40, 36, 64), (64, 576, 192, 16)]


def _run(x, W, A, B, s, bias, p, dy):
    """Our op with a known seed; returns y, grads and the keep mask it must have used."""
    torch.manual_seed(1234)
    y = lora_linear(x, W, A, B, s, bias=bias, dropout=p)
    torch.manual_seed(1234)
    keep = keep_mask(x.detach(), new_seed(), p, A.shape[0])  # the path's own mask (None when p == 0)
    grads = torch.autograd.grad(y, (x, A, B), dy)
    return y, grads, keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,p", [(False, 0.0), (True, 0.0), (False, 0.25), (True, 0.1)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lora_linear_matches_fp64(backend, shape, bias, p, dtype):
    M, K, N, r = shape
    if backend == "triton" and not torch.cuda.is_available() and K > 128:
        pytest.skip("the interpreter takes ~10 s at 576 wide; the small shapes cover the same tiles")
    x = randn(M, K, dtype=dtype, requires_grad=True)
    W = randn(N, K, dtype=dtype, scale=K**-0.5)
    A = randn(r, K, dtype=dtype, scale=K**-0.5, requires_grad=True)
    B = randn(N, r, dtype=dtype, scale=r**-0.5, requires_grad=True)
    b = randn(N, dtype=dtype) if bias else None
    dy = randn(M, N, dtype=dtype)
    s = 2.0
    y, grads, keep = _run(x, W, A, B, s, b, p, dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, A, B)]
    y64 = lora_linear_ref(leaves64[0], W, leaves64[1], leaves64[2], s, bias=b, keep=keep, p=p, upcast=True)
    g64 = torch.autograd.grad(y64, leaves64, dy.double())
    base = None
    if dtype != torch.float32:  # PyTorch's own result in the same dtype bounds ours
        leaves = [t.detach().requires_grad_() for t in (x, A, B)]
        yb = lora_linear_ref(leaves[0], W, leaves[1], leaves[2], s, bias=b, keep=keep, p=p)
        base = [yb, *torch.autograd.grad(yb, leaves, dy)]
    for i, (name, ours, ref) in enumerate(zip(("y", "dx", "dA", "dB"), (y, *grads), (y64, *g64), strict=True)):
        assert ours.dtype == dtype
        assert_close(ours.detach(), ref.detach(), baseline=base[i].detach() if base else None, name=name)


def test_dropout_mask_is_a_function_of_the_seed():
    a, b = dropout_mask(7, 300, 500, 0.3), dropout_mask(7, 300, 500, 0.3)
    assert torch.equal(a, b)
    assert not torch.equal(a, dropout_mask(8, 300, 500, 0.3))
    # Keep rate 0.7 over 150,000 draws: 4.5 sigma is 0.0053; every row and column also keeps near 0.7.
    assert abs(a.float().mean().item() - 0.7) < 0.0053
    assert a.float().mean(1).sub(0.7).abs().max() < 4.5 * math.sqrt(0.21 / 500)
    assert a.float().mean(0).sub(0.7).abs().max() < 4.5 * math.sqrt(0.21 / 300)
    # The mask of a sub-block equals the sub-block of the mask: it depends on (row, col) only, not on the size.
    assert torch.equal(dropout_mask(7, 30, 50, 0.3), a[:30, :50])
    assert dropout_mask(7, 30, 50, 0.0).all()


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_cpu_drop_mask_rate_independence_and_seed(p):
    """The PyTorch path's mask: drop rate p (5 sigma over 1.2 M elements, per row and per column too), neighbours
    dropped together at rate p^2 (the gaps are independent, not a pattern), a pure function of the seed."""
    M, K = 1031, 1152
    a = cpu_drop_mask(11, M, K, p)
    assert a.dtype == torch.bool and a.shape == (M, K)
    assert torch.equal(a, cpu_drop_mask(11, M, K, p)) and not torch.equal(a, cpu_drop_mask(12, M, K, p))
    sd = math.sqrt(p * (1 - p))
    assert abs(a.float().mean().item() - p) < 5 * sd / math.sqrt(M * K)
    assert a.float().mean(1).sub(p).abs().max() < 5 * sd / math.sqrt(K) + 0.01  # no row is stuck
    assert a.float().mean(0).sub(p).abs().max() < 5 * sd / math.sqrt(M) + 0.01  # nor a column
    flat = a.view(-1)
    for lag in (1, 2, 7):
        both = (flat[:-lag] & flat[lag:]).float().mean().item()
        assert abs(both - p * p) < 6 * math.sqrt(p * p * (1 - p * p) * 3 / (M * K))
    assert not cpu_drop_mask(11, 30, 50, 0.0).any()


@pytest.mark.parametrize("p", [0.05, 0.5, 0.99])
def test_cpu_drop_positions_are_sorted_in_range_and_a_prefix_of_a_longer_draw(p):
    """Positions are distinct, sorted and < numel at every size (1 element to more than the first batch of draws
    covers), and those of n elements are those of a longer draw that fall below n (one stream of gaps)."""
    long = drop_positions(5, 40_000, p)
    for n in (1, 7, 8, 37 * 29, 40_000):
        pos = drop_positions(5, n, p)
        assert pos.dtype == torch.int64 and bool((pos[1:] > pos[:-1]).all()) and (pos.numel() == 0 or pos[-1] < n)
        assert torch.equal(pos, long[long < n])
    assert drop_positions(5, 40_000, 0.0).numel() == 0 and drop_positions(5, 0, p).numel() == 0
    with pytest.raises(ValueError, match="p: expected"):
        drop_positions(5, 10, 1.0)


@pytest.mark.parametrize("limit", [1 << 24, 16])
def test_dropped_copy_is_x_row_major_with_the_positions_zeroed(monkeypatch, limit):
    """The copy the forward multiplies: from the reused buffer, and (a limit below x's size) a fresh copy; from a
    transposed x both are row-major, equal to x but at the positions, and x itself is untouched."""
    from sftfuse.kernels import dropout

    monkeypatch.setattr(dropout, "_SCRATCH_MAX", limit)
    x = randn(9, 7, dtype=torch.bfloat16).T
    before = x.clone()
    pos = drop_positions(3, x.numel(), 0.3)
    got = dropout.dropped_copy(x, pos)
    want = x.contiguous().view(-1).clone()
    want[pos] = 0
    assert got.is_contiguous() and got.shape == x.shape and torch.equal(got.view(-1), want)
    assert torch.equal(x, before)


@pytest.mark.parametrize("gemm", ["native", "fp32"])
def test_cpu_dropout_on_a_strided_input(monkeypatch, gemm):
    """x given transposed (not contiguous), on the PyTorch path with GEMMs in x's dtype and in fp32 (where x's cast
    copy keeps x's strides): the dropped positions still index x row-major, so y and the grads match the reference
    at the path's own mask."""
    monkeypatch.setenv("SFTFUSE_BACKEND", "torch")
    monkeypatch.setenv("SFTFUSE_CPU_GEMM", gemm)
    M, K, N, r, p = 37, 48, 20, 8, 0.3
    x = randn(K, M, dtype=torch.bfloat16).T.requires_grad_()
    assert not x.is_contiguous()
    W, A, B = randn(N, K, dtype=torch.bfloat16), randn(r, K, requires_grad=True), randn(N, r, requires_grad=True)
    dy = randn(M, N, dtype=torch.bfloat16)
    torch.manual_seed(5)
    y = lora_linear(x, W, A, B, 2.0, dropout=p)
    torch.manual_seed(5)
    keep = keep_mask(x.detach(), new_seed(), p, r)
    got = torch.autograd.grad(y, (x, A, B), dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B)]
    ref = lora_linear_ref(leaves[0], W, leaves[1], leaves[2], 2.0, keep=keep, p=p, upcast=True)
    assert_close(y.float(), ref.detach(), dtype=torch.bfloat16, name="y")
    for name, g, rg in zip(("dx", "dA", "dB"), got, torch.autograd.grad(ref, leaves, dy.double()), strict=True):
        assert_close(g.float(), rg, dtype=torch.bfloat16, name=name)


def test_forward_and_backward_use_the_same_cpu_mask():
    """On the PyTorch path the backward draws the forward's positions again from the seed: with the default
    generator moved on between forward and backward (other layers draw seeds meanwhile), dA still matches the
    reference at the forward's mask, and x's gradient is zero exactly where the mask dropped x (B = 0 rows aside)."""
    M, K, N, r, p = 45, 64, 24, 8, 0.5
    x = randn(M, K, requires_grad=True)
    W, A, B = randn(N, K), randn(r, K, requires_grad=True), randn(N, r, requires_grad=True)
    torch.manual_seed(3)
    y = lora_linear(x, W * 0, A, B, 1.0, dropout=p)  # zero base: dx is the adapter's term alone
    torch.manual_seed(3)
    keep = keep_mask(x.detach(), new_seed(), p, r)
    torch.rand(1000)  # the default generator moves on before the backward
    dx, dA = torch.autograd.grad(y, (x, A), torch.ones(M, N))
    assert torch.equal(dx != 0, keep)
    A64 = A.detach().double().requires_grad_()
    ref = torch.autograd.grad(lora_linear_ref(x.detach(), W * 0, A64, B.detach(), 1.0, keep=keep, p=p, upcast=True),
                              A64, torch.ones(M, N, dtype=torch.float64))[0]
    assert_close(dA, ref, name="dA")


def test_dropout_expectation_over_seeds(backend):
    """E over masks of the dropped-out output is the output without dropout (inverted-dropout scaling)."""
    M, K, N, r, p, n = 6, 24, 10, 4, 0.5, 120
    x, W, A, B = randn(M, K), randn(N, K), randn(r, K), randn(N, r)
    ys = torch.stack([lora_linear(x, W, A, B, 1.0, dropout=p) for _ in range(n)]).double()
    y0 = lora_linear_ref(x, W, A, B, 1.0, upcast=True)
    err = (ys.mean(0) - y0).abs()
    assert (err <= 5 * ys.std(0) / math.sqrt(n) + 1e-5).all(), err.max()
    # Eval mode, or p = 0: no dropout at all.
    assert_close(lora_linear(x, W, A, B, 1.0, dropout=p, training=False), y0)


def test_saves_x_and_t_only():
    """The activations saved for backward are x (as a view) and t (tokens x r): no dropped-out copy of x, and no
    mask (the backward draws it again from the seed)."""
    M, K, N, r = 64, 48, 40, 8
    x, W = randn(2, M // 2, K, requires_grad=True), randn(N, K)
    A, B = randn(r, K, requires_grad=True), randn(N, r, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear(x, W, A, B, 2.0, dropout=0.1)
    params = {t.untyped_storage().data_ptr() for t in (W, A, B)}
    acts = {t.untyped_storage().data_ptr(): t for t in saved if t.untyped_storage().data_ptr() not in params}
    assert x.untyped_storage().data_ptr() in acts
    assert sum(t.untyped_storage().nbytes() for t in acts.values()) == (M * K + M * r) * 4


def test_3d_input_no_base_grad_and_bias_grad(backend):
    x = randn(3, 5, 24, requires_grad=True)
    W = randn(16, 24, requires_grad=False)
    A, B, b = randn(4, 24, requires_grad=True), randn(16, 4, requires_grad=True), randn(16, requires_grad=True)
    y = lora_linear(x, W, A, B, 0.5, bias=b)
    assert y.shape == (3, 5, 16)
    dy = randn(3, 5, 16)
    dx, db = torch.autograd.grad(y, (x, b), dy)
    assert dx.shape == x.shape and W.grad is None
    assert_close(db, dy.double().sum((0, 1)))


def test_adapters_in_other_dtype_get_grads_in_their_dtype():
    """PEFT-style fp32 adapters on a bf16 base: computed in bf16, gradients returned in fp32."""
    x, W = randn(9, 16, dtype=torch.bfloat16, requires_grad=True), randn(12, 16, dtype=torch.bfloat16)
    A, B = randn(4, 16, requires_grad=True), randn(12, 4, requires_grad=True)
    dA, dB = torch.autograd.grad(lora_linear(x, W, A, B, 1.0).float().sum(), (A, B))
    assert dA.dtype == dB.dtype == torch.float32


def test_fp32_input_over_bf16_base_computes_in_bf16():
    """Autocast's case: fp32 activations over a bf16 base. x is cast as autocast casts for F.linear; its
    gradient comes back in fp32, the adapters' in theirs."""
    x = randn(13, 40, requires_grad=True)
    W = randn(24, 40, dtype=torch.bfloat16, scale=40**-0.5)
    A, B = randn(8, 40, scale=40**-0.5, requires_grad=True), randn(24, 8, scale=8**-0.5, requires_grad=True)
    dy = randn(13, 24, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, W, A, B, 2.0)
    dx, dA, dB = torch.autograd.grad(y, (x, A, B), dy)
    assert y.dtype == torch.bfloat16 and dx.dtype == dA.dtype == dB.dtype == torch.float32
    leaves64 = [t.detach().to(torch.bfloat16).double().requires_grad_() for t in (x, A, B)]
    y64 = lora_linear_ref(leaves64[0], W, leaves64[1], leaves64[2], 2.0, upcast=True)
    g64 = torch.autograd.grad(y64, leaves64, dy.double())
    xb, Ab, Bb = (t.detach().to(torch.bfloat16).requires_grad_() for t in (x, A, B))
    yb = lora_linear_ref(xb, W, Ab, Bb, 2.0)
    gb = torch.autograd.grad(yb, (xb, Ab, Bb), dy)
    for name, ours, ref, b in zip(("y", "dx", "dA", "dB"), (y, dx, dA, dB), (y64, *g64), (yb, *gb), strict=True):
        assert_close(ours.detach().to(torch.bfloat16), ref.detach(), baseline=b.detach(), name=name)


@pytest.mark.parametrize("gemm", ["native", "fp32"])
def test_cpu_gemm_dtype_choice_keeps_results(monkeypatch, gemm):
    """The PyTorch path on bf16 inputs with GEMMs forced to bf16 or to fp32 (SFTFUSE_CPU_GEMM; auto measures
    which is faster): both match fp64, over a dense and an NF4 base, with dropout."""
    monkeypatch.setenv("SFTFUSE_BACKEND", "torch")
    monkeypatch.setenv("SFTFUSE_CPU_GEMM", gemm)
    test_lora_linear_matches_fp64("torch", (67, 70, 45, 8), True, 0.1, torch.bfloat16)
    test_lora_linear_nf4_base("torch", (40, 128, 96, 16), 0.2, torch.bfloat16)


@pytest.mark.parametrize("gemm", ["native", "fp32"])
def test_fp32_adapters_compute_unrounded_where_gemms_run_in_fp32(monkeypatch, gemm):
    """bf16 x over a bf16 base with fp32 adapters (PEFT's layout): with fp32 GEMMs the adapters compute as they
    are, so dA = s (dy B)^T x matches fp64 to fp32 rounding; with bf16 GEMMs B is rounded to bf16 first (2^-9)."""
    monkeypatch.setenv("SFTFUSE_BACKEND", "torch")
    monkeypatch.setenv("SFTFUSE_CPU_GEMM", gemm)
    x, W = randn(37, 70, dtype=torch.bfloat16, requires_grad=True), randn(45, 70, dtype=torch.bfloat16)
    A, B = randn(8, 70, requires_grad=True), randn(45, 8, requires_grad=True)
    dy = randn(37, 45, dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora_linear(x, W, A, B, 2.0)
    assert {A.data_ptr(), B.data_ptr()} <= {t.data_ptr() for t in saved}  # the adapters themselves, no casts
    dA, dB = torch.autograd.grad(y, (A, B), dy)
    assert y.dtype == torch.bfloat16 and dA.dtype == dB.dtype == torch.float32
    dA64 = 2.0 * (dy.double() @ B.double()).T @ x.double()
    err = ((dA - dA64).abs().max() / dA64.abs().max()).item()
    assert err < 1e-5 if gemm == "fp32" else err > 1e-4


def test_rank_above_64_takes_the_pytorch_path_with_one_warning(monkeypatch):
    """The Triton kernels hold the rank in one tile of at most 64: the launcher sends a larger rank to the PyTorch
    path (the same result, bit for bit) and says so once per process, not once per call."""
    from sftfuse.kernels import _registry

    monkeypatch.setattr(_registry, "_WARNED", set())
    monkeypatch.setenv("SFTFUSE_BACKEND", "triton")
    x, W = randn(9, 16, requires_grad=True), randn(12, 16)
    A, B = randn(72, 16, requires_grad=True), randn(12, 72, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ys = [lora_linear(x, W, A, B, 0.5) for _ in range(2)]
        grads = torch.autograd.grad(ys[0].sum(), (x, A, B))
    assert [str(w.message) for w in caught if "rank" in str(w.message)] == [
        "lora: rank 72 > 64 takes the PyTorch path (the Triton kernels hold the rank in one tile of at most 64)"]
    monkeypatch.setenv("SFTFUSE_BACKEND", "torch")
    y = lora_linear(x, W, A, B, 0.5)
    assert torch.equal(ys[1], y)
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(y.sum(), (x, A, B)), strict=True))


def test_bad_arguments():
    x, W, A, B = randn(4, 8), randn(6, 8), randn(2, 8), randn(6, 2)
    with pytest.raises(ValueError, match="lora_A"):
        lora_linear(x, W, randn(2, 7), B, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        lora_linear(x, W, A, randn(5, 2), 1.0)
    with pytest.raises(ValueError, match="x"):
        lora_linear(randn(4, 9), W, A, B, 1.0)
    with pytest.raises(ValueError, match="dropout"):
        lora_linear(x, W, A, B, 1.0, dropout=1.0)
    with pytest.raises(TypeError, match="base"):
        lora_linear(x, W.to(torch.int8), A, B, 1.0)
    with pytest.raises(ValueError, match="r"):
        LoRALinear.from_linear(nn.Linear(8, 6), r=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_init_follows_peft_and_base_dtype(dtype):
    base = nn.Linear(40, 24, dtype=dtype)
    m = LoRALinear.from_linear(base, r=8, lora_alpha=16)
    assert m.lora_A.shape == (8, 40) and m.lora_B.shape == (24, 8) and m.lora_A.dtype == dtype
    assert (m.lora_B == 0).all() and m.lora_A.abs().max() <= 1 / math.sqrt(40) + 1e-6  # kaiming a=sqrt(5) bound
    assert not base.weight.requires_grad and m.scaling == 2.0
    assert LoRALinear.from_linear(nn.Linear(4, 4), r=16, lora_alpha=8, use_rslora=True).scaling == 2.0
    x = randn(5, 40, dtype=dtype)
    assert torch.equal(m(x), base(x))  # B = 0: the adapter starts as the identity on the base


@pytest.mark.parametrize("rslora,bias", [(False, True), (True, False)])
def test_matches_peft_lora_layer(backend, rslora, bias):
    from peft import LoraConfig, LoraModel

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(48, 40, bias=bias))
    cfg = LoraConfig(r=8, lora_alpha=24, lora_dropout=0.0, target_modules=["0"], use_rslora=rslora)
    peft_layer = LoraModel(net, cfg, "default").model[0]
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_()  # a live adapter, not PEFT's zero init
    ours = LoRALinear.from_linear(nn.Linear(48, 40, bias=bias), r=8, lora_alpha=24, use_rslora=rslora)
    ours.load_state_dict({"base_layer.weight": peft_layer.base_layer.weight,
                          **({"base_layer.bias": peft_layer.base_layer.bias} if bias else {}),
                          "lora_A": peft_layer.lora_A["default"].weight, "lora_B": peft_layer.lora_B["default"].weight})
    assert ours.scaling == peft_layer.scaling["default"]
    x = randn(3, 7, 48, requires_grad=True)
    dy = randn(3, 7, 40)
    y_ref = peft_layer(x)
    g_ref = torch.autograd.grad(y_ref, (x, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight),
                                dy)
    y = ours(x)
    g = torch.autograd.grad(y, (x, ours.lora_A, ours.lora_B), dy)
    assert_close(y.detach(), y_ref.detach().double(), name="y")
    for name, a, b in zip(("dx", "dA", "dB"), g, g_ref, strict=True):
        assert_close(a, b.double(), name=name)


def test_frozen_input_gets_no_grad_and_adapters_still_train(backend):
    """x without grad (the first layer's input): the dx kernel is skipped, dA and dB still match the reference."""
    x, W = randn(21, 40), randn(24, 40)
    A, B = randn(8, 40, requires_grad=True), randn(24, 8, requires_grad=True)
    dy = randn(21, 24)
    torch.manual_seed(5)
    dA, dB = torch.autograd.grad(lora_linear(x, W, A, B, 1.5, dropout=0.2), (A, B), dy)
    torch.manual_seed(5)
    keep = keep_mask(x, new_seed(), 0.2, 8)
    A64, B64 = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    ref = torch.autograd.grad(lora_linear_ref(x, W, A64, B64, 1.5, keep=keep, p=0.2, upcast=True), (A64, B64),
                              dy.double())
    assert_close(dA, ref[0], name="dA")
    assert_close(dB, ref[1], name="dB")


# NF4 base: odd out features (45) with in features 70, so the flattened weight ends in a partial 64-block; 128
# wide at r=16 crosses the interpreter's 32-wide tiles. The reference uses the dequantized weight in fp64; on the
# Triton path the kernel decodes NF4 in registers (in the interpreter, kept in fp32 rather than rounded to bf16).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,p", [((37, 70, 45, 8), 0.0), ((40, 128, 96, 16), 0.2)], ids=["odd", "dropout"])
def test_lora_linear_nf4_base(backend, shape, p, dtype):
    from sftfuse.kernels.nf4 import _dequantize_torch, quantize_nf4

    M, K, N, r = shape
    q = quantize_nf4(randn(N, K, scale=K**-0.5).to(dtype), blocksize=64, double_quant=True)
    W = _dequantize_torch(q, dtype)  # the oracle's weight, on the PyTorch path whatever the backend
    x = randn(M, K, dtype=dtype, requires_grad=True)
    A = randn(r, K, dtype=dtype, scale=K**-0.5, requires_grad=True)
    B = randn(N, r, dtype=dtype, scale=r**-0.5, requires_grad=True)
    b, dy = randn(N, dtype=dtype), randn(M, N, dtype=dtype)
    y, grads, keep = _run(x, q, A, B, 2.0, b, p, dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, A, B)]
    y64 = lora_linear_ref(leaves64[0], W, leaves64[1], leaves64[2], 2.0, bias=b, keep=keep, p=p, upcast=True)
    g64 = torch.autograd.grad(y64, leaves64, dy.double())
    base = None
    if dtype != torch.float32:
        leaves = [t.detach().requires_grad_() for t in (x, A, B)]
        yb = lora_linear_ref(leaves[0], W, leaves[1], leaves[2], 2.0, bias=b, keep=keep, p=p)
        base = [yb.detach(), *torch.autograd.grad(yb, leaves, dy)]
    for i, (name, ours, ref) in enumerate(zip(("y", "dx", "dA", "dB"), (y, *grads), (y64, *g64), strict=True)):
        assert_close(ours.detach(), ref.detach(), baseline=base[i] if base else None, name=name)


def test_lora_module_over_nf4linear(backend):
    from sftfuse.kernels.nf4 import _dequantize_torch
    from sftfuse.modules.linear import NF4Linear

    base = NF4Linear.from_linear(nn.Linear(64, 48), compute_dtype=torch.float32)
    m = LoRALinear.from_linear(base, r=8, lora_alpha=16)
    assert m.lora_A.dtype == torch.float32 and not any(p.requires_grad for p in base.parameters())
    with torch.no_grad():
        m.lora_B.normal_()
    x = randn(3, 5, 64, requires_grad=True)
    y = m(x)
    W = _dequantize_torch(base.quant, torch.float32)
    ref = lora_linear_ref(x.reshape(-1, 64), W, m.lora_A, m.lora_B, 2.0, bias=base.bias, upcast=True)
    assert_close(y.detach().reshape(-1, 48), ref.detach())
    dA, = torch.autograd.grad(y.sum(), (m.lora_A,))
    assert dA.shape == (8, 64)
