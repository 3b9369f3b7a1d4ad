"""linear_cross_entropy on both paths (PyTorch; Triton in the interpreter) against F.linear + F.cross_entropy in fp64.

bf16 on the Triton path: the kernels upcast loads to fp32 under the interpreter (UPCAST), so they are more precise
than PyTorch's bf16 baseline, which bounds the error allowed (`assert_close(..., baseline=...)`).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sftfuse.kernels import cross_entropy as ce
from sftfuse.kernels import cross_entropy_launch as lce
from sftfuse.kernels.cross_entropy import linear_cross_entropy_ref
from sftfuse.ops.cross_entropy import linear_cross_entropy
from tests.helpers import assert_close, poison, randn

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(lead, H, V, dtype, *, masked=0.5, bias=True, ignore_index=-100):
    hidden = randn(*lead, H, dtype=dtype, requires_grad=True)
    weight = randn(V, H, dtype=dtype, scale=H**-0.5 * 2, requires_grad=True)  # logits of std ~2
    b = randn(V, dtype=dtype, scale=0.5, requires_grad=True) if bias else None
    labels = torch.randint(0, V, lead)
    labels[torch.rand(lead) < masked] = ignore_index
    return hidden, weight, b, labels


def _check(hidden, weight, bias, labels, **kw):
    """Loss and grads of (hidden, weight, bias) vs the fp64 ref; in bf16 also vs PyTorch's own bf16 result."""
    dtype = hidden.dtype
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    out = linear_cross_entropy(hidden, weight, labels, bias=bias, **kw)
    ref64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = linear_cross_entropy_ref(ref64[0], ref64[1], labels, bias=ref64[2] if bias is not None else None, **kw)
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, grad_out.float())
    ref_grads = torch.autograd.grad(ref, ref64, grad_out)
    base, base_grads = [None], [None] * len(leaves)
    if dtype != torch.float32:  # PyTorch in the same low precision: the error we are held to
        b_leaves = [t.detach().clone().requires_grad_() for t in leaves]
        b_out = linear_cross_entropy_ref(b_leaves[0], b_leaves[1], labels,
                                         bias=b_leaves[2] if bias is not None else None, **kw)
        base = [b_out.detach().float()]
        base_grads = torch.autograd.grad(b_out, b_leaves, grad_out.to(dtype))
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert_close(out, ref.detach(), dtype=dtype, baseline=base[0], name="loss")
    for name, g, r, b in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, ref_grads, base_grads):
        assert g.dtype == dtype
        assert_close(g, r, dtype=dtype, baseline=b, name=name)


# Every option alone and all together, at an odd size (37 tokens x 2, H=64, V=1031: no dimension is a multiple of
# a block) so that each option's term in the loss and in the gradient is checked on its own.
OPTIONS = {
    "mean": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "logit_scale": {"logit_scale": 0.5},
    "softcap": {"softcap": 3.0, "logit_scale": 2.0},  # cap after scale: both orders differ
    "num_items": {"num_items_in_batch": 123},
    "shift": {"shift_labels": True},
    "ignore_7": {"ignore_index": 7},
    "all": {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 4.0, "logit_scale": 1.3, "shift_labels": True,
            "num_items_in_batch": 40},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", OPTIONS)
def test_options_match_reference(backend, case, dtype):
    kw = OPTIONS[case]
    hidden, weight, bias, labels = _inputs((2, 37), 64, 1031, dtype, ignore_index=kw.get("ignore_index", -100))
    _check(hidden, weight, bias, labels, **kw)


# Odd sizes: one token; 37 tokens at H=100 (not a multiple of BLOCK_K) with V=1000 and 1031; 1000 tokens (many row
# chunks/blocks) on the PyTorch path only (the interpreter is slow there); a GPT-2-like vocabulary (50257, prime-ish,
# 393 vocab tiles) at a few tokens; and the real SmolLM2 head (H=576, V=49152) on the PyTorch path.
SHAPES = [(1, 64, 1000, "both"), (37, 100, 1031, "both"), (37, 100, 1000, "both"), (1000, 64, 1000, "torch"),
          (6, 64, 50257, "both"), (64, 576, 49152, "torch")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:3])))
def test_sizes_match_reference(backend, shape, dtype):
    n, H, V, paths = shape
    if paths == "torch" and backend == "triton":
        pytest.skip("too slow for the Triton interpreter")
    hidden, weight, bias, labels = _inputs((n,), H, V, dtype, masked=0.3)
    labels[0] = 3  # at least one counted token
    _check(hidden, weight, bias, labels)


@pytest.mark.parametrize("tiles", [(8, 1031), (8, 128), (37, 64), (1, 1000)], ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("gemm", ["native", "fp32"])
def test_small_tiles_match_reference(monkeypatch, tiles, gemm):
    """PyTorch path: many row chunks and vocabulary tiles, the last of each partial (1031 = 8 x 128 + 7), so the
    online log-sum-exp and the recomputed second pass run; GEMMs in the weight's dtype and in fp32."""
    monkeypatch.setattr(ce, "_config", lambda V, H, **kw: tiles)
    monkeypatch.setenv("SFTFUSE_BACKEND", "torch")
    monkeypatch.setenv("SFTFUSE_CPU_GEMM", gemm)
    for dtype in DTYPES:
        _check(*_inputs((2, 37), 64, 1031, dtype, masked=0.4), label_smoothing=0.1, softcap=5.0, z_loss=1e-3)
        _check(*_inputs((2, 37), 64, 1031, dtype), reduction="none", logit_scale=0.7)


@pytest.mark.parametrize("order", ["ascending", "shuffled"])
@pytest.mark.parametrize("counted", [1, 9, 40, 74])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_gradient_rows_formed_in_place(monkeypatch, order, counted, frozen):
    """PyTorch path: the counted rows' dh is formed in the gradient's first rows and moved to its rows at the end,
    the working buffers carved from its other rows (then zeroed): few counted rows (room for every buffer), some (room
    for some) and all (none), the last row of h counted (a buffer's rows are destinations), bf16 buffers in fp32
    space, and rows not ascending (a separate buffer then, all of dh free). Against fp64 autograd: the loss, every
    row of dh (the uncounted ones exactly zero) and dW."""
    monkeypatch.setattr(ce, "_SCATTER_BLOCK", 4)  # many blocks, moved from the last
    N, H, V = 74, 64, 1031
    for dtype in DTYPES:
        h, w = randn(N, H, dtype=dtype), randn(V, H, dtype=dtype, scale=H**-0.5 * 2)
        h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
        idx = torch.cat([torch.randperm(N - 1)[: counted - 1], torch.tensor([N - 1])]).sort().values
        if order == "shuffled":
            idx = idx[torch.randperm(counted)]
        y, rw = torch.randint(0, V, (counted,)), torch.rand(counted)
        per = torch.nn.functional.cross_entropy(h64[idx] @ w64.T, y, reduction="none")
        (per * rw.double()).sum().backward()
        for tiles in [(8, 128), (8, 1031), (64, 256)]:
            out = ce.linear_cross_entropy_torch(h, w, None, y, rw, rows_idx=idx, tiles=tiles, need_dw=not frozen,
                                                need_db=False)
            assert_close(out[0], per.detach(), dtype=dtype, name="loss")
            assert_close(out[3], h64.grad, dtype=dtype, name=f"dh {tiles}")
            uncounted = torch.ones(N, dtype=torch.bool).index_fill_(0, idx, False)
            assert (out[3][uncounted] == 0).all()
            if not frozen:
                assert_close(out[4], w64.grad, dtype=dtype, name=f"dW {tiles}")


def test_tile_choice_fits_the_budget():
    """The SmolLM2 head in fp32 is tiled over the vocabulary inside the budget; a small head is one tile."""
    rows, cols = ce._config(49152, 576, n=1024, gemm_bytes=4, weight_cast=False, softcap=False)
    assert cols < 49152 and rows * cols * 4 + 2 * rows * 576 * 4 <= ce._TORCH_BUDGET
    assert ce._config(1031, 64, n=74, gemm_bytes=4, weight_cast=False, softcap=True) == (74, 1031)
    rows, cols = ce._config(49152, 576, n=1024, gemm_bytes=4, weight_cast=True, softcap=True)
    assert rows * cols * 8 + 2 * rows * 576 * 4 <= ce._TORCH_BUDGET  # the cast weight slice comes on top
    assert (rows, cols) == ce._config(49152, 576, n=1024, gemm_bytes=4, weight_cast=False, softcap=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_masked_gives_zero_loss_and_grads(backend, reduction):
    hidden, weight, bias, labels = _inputs((3, 5), 64, 1031, torch.float32, masked=1.0)
    loss, stats = linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction, return_stats=True,
                                       z_loss=1e-3, label_smoothing=0.1)
    grads = torch.autograd.grad(loss, [hidden, weight, bias], torch.randn_like(loss))
    assert torch.equal(loss, torch.zeros_like(loss))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert int(stats.n_tokens) == 0 and float(stats.accuracy) == 0.0 and float(stats.mean_z) == 0.0


def test_one_counted_token(backend):
    hidden, weight, bias, labels = _inputs((2, 9), 64, 1031, torch.float32, masked=1.0)
    labels[1, 4] = 17
    _check(hidden, weight, bias, labels, z_loss=1e-2)
    g = torch.autograd.grad(linear_cross_entropy(hidden, weight, labels), hidden)[0]
    assert g[1, 4].abs().sum() > 0 and g.abs().sum() == g[1, 4].abs().sum()  # only that row gets a gradient


def test_stats(backend):
    hidden, weight, bias, labels = _inputs((4, 16), 64, 1031, torch.float32)
    labels[0, :4] = torch.nn.functional.linear(hidden[0, :4], weight, bias).argmax(-1)  # some hits for sure
    _, stats = linear_cross_entropy(hidden, weight, labels, bias=bias, return_stats=True)
    z = torch.nn.functional.linear(hidden.double(), weight.double(), bias.double())
    mask = labels != -100
    assert int(stats.n_tokens) == int(mask.sum()) and stats["n_tokens"] is stats.n_tokens
    acc = (z.argmax(-1) == labels)[mask].double().mean()
    assert abs(float(stats.accuracy) - float(acc)) < 1e-6 and float(stats.accuracy) >= 4 / int(mask.sum()) - 1e-6
    assert abs(float(stats.mean_z) - float(torch.logsumexp(z, -1)[mask].mean())) < 1e-4


def test_grad_accumulation_with_num_items_is_exact(backend):
    """Two micro-batches with num_items_in_batch = the total count sum to the full batch's mean loss and grads."""
    hidden, weight, bias, labels = _inputs((4, 21), 64, 1031, torch.float32, masked=0.6)
    total = int((labels != -100).sum())
    full = linear_cross_entropy(hidden, weight, labels, bias=bias)
    g_full = torch.autograd.grad(full, [hidden, weight, bias])
    parts = [linear_cross_entropy(hidden[i:i + 2], weight, labels[i:i + 2], bias=bias, num_items_in_batch=total)
             for i in (0, 2)]
    g_parts = [torch.autograd.grad(p, [hidden, weight, bias]) for p in parts]
    assert abs(float(sum(parts)) - float(full)) < 1e-5
    for a, b, c in zip(g_full, *g_parts):
        assert torch.allclose(a, b + c, atol=1e-6, rtol=1e-5)


class _CountMatmulRows(TorchDispatchMode):
    """Records the rows of every matmul against the (V, H) weight (or its transpose)."""

    def __init__(self, V):
        super().__init__()
        self.V, self.rows, self.flops = V, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.out,
                    torch.ops.aten.addmm.out, torch.ops.aten.addmm_.default):
            a, b = (args[0], args[1]) if "addmm" not in str(func) else (args[1], args[2])
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            if b.shape[1] == self.V:  # the logits matmul (c, H) @ (H, V)
                self.rows += a.shape[0]
        return func(*args, **(kwargs or {}))


def test_only_counted_rows_reach_the_matmul(monkeypatch):
    """PyTorch path: logit rows == counted labels, and the FLOPs are 6 n H V for n counted tokens (not N)."""
    monkeypatch.setenv("SFTFUSE_BACKEND", "torch")
    H, V = 64, 1031
    hidden, weight, _, labels = _inputs((3, 50), H, V, torch.float32, masked=0.7)
    n = int((labels != -100).sum())
    with _CountMatmulRows(V) as mode:
        loss = linear_cross_entropy(hidden, weight, labels)
        torch.autograd.grad(loss, [hidden, weight])
    assert mode.rows == n < labels.numel()
    assert mode.flops == 6 * n * H * V


def test_triton_launchers_see_counted_rows_and_write_every_output(monkeypatch):
    """Triton path: the kernels get only the counted rows; outputs start as NaN, so an unwritten one shows."""
    monkeypatch.setenv("SFTFUSE_BACKEND", "triton")
    monkeypatch.setattr(lce, "_empty", lambda *s, **kw: poison(torch.empty(*s, **kw)))
    seen = []
    fwd = lce.lce_fwd_triton
    monkeypatch.setattr(lce, "lce_fwd_triton", lambda h, *a, **k: seen.append(h.shape[0]) or fwd(h, *a, **k))
    hidden, weight, bias, labels = _inputs((2, 37), 64, 1031, torch.float32, masked=0.7)
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, reduction="none")
    assert seen == [int((labels != -100).sum())] and torch.isfinite(loss).all()
    _check(hidden, weight, bias, labels, reduction="none")


# A frozen bias (a head whose bias does not require grad, with or without a trained weight): found by running a
# peer's (Liger's) cases on the Triton path, whose launcher once passed the hidden-gradient buffer as the absent bias
# gradient's while the kernel still summed into it: db landed in dh's first V entries (wrong input gradients), and
# past dh's end when V > n x H (the interpreter process died). Both sizes are here: 37 x 2 rows (V < n H) and 3.
@pytest.mark.parametrize("lead", [(2, 37), (1, 3)], ids=["V-below-nH", "V-above-nH"])
@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen-weight", "trained-weight"])
def test_frozen_bias_gets_no_gradient(backend, lead, train_weight):
    hidden, weight, bias, labels = _inputs(lead, 64, 1031, torch.float32, masked=0.3)
    bias.requires_grad_(False)
    weight.requires_grad_(train_weight)
    leaves = [hidden, weight] if train_weight else [hidden]
    out = linear_cross_entropy(hidden, weight, labels, bias=bias)
    grads = torch.autograd.grad(out, leaves)
    ref64 = [t.detach().double().requires_grad_() for t in leaves]
    w64 = ref64[1] if train_weight else weight.detach().double()
    ref = linear_cross_entropy_ref(ref64[0], w64, labels, bias=bias.double())
    for name, g, r in zip(("grad_hidden", "grad_weight"), grads, torch.autograd.grad(ref, ref64)):
        assert_close(g, r, dtype=torch.float32, name=name)


def test_frozen_weight_gets_no_gradient_work(backend, monkeypatch):
    """LoRA: the head is frozen, so the weight gradient is never formed (the paths are told so)."""
    flags = []
    for name in ("linear_cross_entropy_torch", "lce_grads_triton"):
        real = getattr(lce, name)
        monkeypatch.setattr(lce, name, lambda *a, _real=real, **k: flags.append(k.get("need_dw")) or _real(*a, **k))
    hidden, weight, _, labels = _inputs((2, 37), 64, 1031, torch.float32)
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, labels)
    g = torch.autograd.grad(loss, hidden)[0]
    ref = torch.autograd.grad(linear_cross_entropy_ref(hidden, weight, labels), hidden)[0]
    assert flags and all(f is False for f in flags if f is not None) and False in flags
    assert_close(g, ref.double(), dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_grad_forms_no_gradient(backend, monkeypatch, dtype):
    """Under torch.no_grad (an evaluation of a trained head: full fine-tuning) the forward forms no gradient, though
    the weight and hidden require grad (autograd's needs_input_grad says True there); the loss is unchanged.
    Before the fix the PyTorch path formed dh, dW and db in the forward and threw them away."""
    calls = []
    real = lce.linear_cross_entropy_forward
    monkeypatch.setattr(lce, "linear_cross_entropy_forward",
                        lambda *a, _real=real, **k: calls.append(k["needs"]) or _real(*a, **k))
    hidden, weight, bias, labels = _inputs((3, 29), 64, 1031, dtype, masked=0.3)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias)
    assert calls == [(False, False, False)]
    assert not loss.requires_grad
    ref = linear_cross_entropy_ref(hidden.detach(), weight.detach(), labels, bias=bias.detach(), upcast=True)
    assert_close(loss.double(), ref, dtype=dtype, name="loss")
    linear_cross_entropy(hidden, weight, labels, bias=bias)  # grad mode on again: every gradient wanted
    assert calls[-1] == (True, True, True)


# The options that change the one-pass gradient's finishing terms (smoothing's is a column sum of the weight, softcap's
# a factor on every entry) and one where smoothing meets softcap, which takes the two-pass path.
FROZEN_OPTIONS = [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}, {"softcap": 5.0, "logit_scale": 1.3},
                  {"num_items_in_batch": 50}, {"label_smoothing": 0.1, "softcap": 5.0}]


@pytest.mark.parametrize("gemm", ["native", "fp32"])
@pytest.mark.parametrize("kw", FROZEN_OPTIONS, ids=lambda kw: "-".join(kw) or "plain")
def test_frozen_head_takes_one_pass(monkeypatch, kw, gemm):
    """PyTorch path, a frozen head over many vocabulary tiles (1031 = 8 x 128 + 7): dh is accumulated in the
    log-sum-exp pass, rescaled as each row's max grows, so the logits are formed once (4 n H V FLOPs, not 6) and dh
    still matches fp64."""
    monkeypatch.setattr(ce, "_config", lambda V, H, **_: (8, 128))
    monkeypatch.setenv("SFTFUSE_BACKEND", "torch")
    monkeypatch.setenv("SFTFUSE_CPU_GEMM", gemm)
    H, V = 64, 1031
    for dtype in DTYPES:
        hidden, weight, _, labels = _inputs((2, 37), H, V, dtype, masked=0.4)
        weight.requires_grad_(False)
        n = int((labels != -100).sum())
        grad_out = torch.rand(()) + 0.5
        with _CountMatmulRows(V) as mode:
            g = torch.autograd.grad(linear_cross_entropy(hidden, weight, labels, **kw), hidden, grad_out)[0]
        assert mode.flops == (6 if "softcap" in kw and "label_smoothing" in kw else 4) * n * H * V
        h64 = hidden.detach().double().requires_grad_()
        ref = torch.autograd.grad(linear_cross_entropy_ref(h64, weight.double(), labels, **kw), h64,
                                  grad_out.double())[0]
        h16 = hidden.detach().clone().requires_grad_()
        base = torch.autograd.grad(linear_cross_entropy_ref(h16, weight, labels, **kw), h16, grad_out.to(dtype))[0]
        assert g.dtype == dtype
        assert_close(g, ref, dtype=dtype, baseline=None if dtype == torch.float32 else base, name=f"dh {dtype}")


@pytest.mark.parametrize("case", ["trained", "frozen", "none"])
def test_triton_chunks_and_slices(monkeypatch, case):
    """Triton path with the plan forced small: several row chunks (the last partial: 2 x 37 rows in chunks of 32),
    several vocabulary slices (the last partial: 1031 = 8 x 128 + 7 over 3 slices), so the slices' log-sum-exp
    merge, the dW kernel's first-chunk store and later-chunk add, and dh per chunk all run; fp32 and bf16."""
    from sftfuse.kernels import cross_entropy_triton as kt

    monkeypatch.setenv("SFTFUSE_BACKEND", "triton")
    monkeypatch.setattr(kt, "ROWS_TRAINED", 32)
    monkeypatch.setattr(kt, "ROWS_FROZEN", 32)
    monkeypatch.setattr(kt, "SMS", 2)  # 2 x 2 programs over 2 row blocks: 2 vocabulary slices per row block
    plan = kt.lce_plan(60, 1031, 64, torch.float32, grads=True, need_dw=True)
    assert plan.chunks == 2 and plan.splits >= 2 and (plan.splits - 1) * plan.tiles_per_split * 128 < 1031
    for dtype in DTYPES:
        hidden, weight, bias, labels = _inputs((2, 37), 64, 1031, dtype, masked=0.2)
        if case == "frozen":
            weight.requires_grad_(False)
            bias.requires_grad_(False)
        kw = {"reduction": "none"} if case == "none" else {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 6.0}
        _check_leaves(hidden, weight, bias, labels, **kw)


def _check_leaves(hidden, weight, bias, labels, **kw):
    """`_check` for the leaves that require grad (a frozen head's weight and bias do not)."""
    if weight.requires_grad:
        return _check(hidden, weight, bias, labels, **kw)
    out = linear_cross_entropy(hidden, weight, labels, bias=bias, **kw)
    h64 = hidden.detach().double().requires_grad_()
    ref = linear_cross_entropy_ref(h64, weight.double(), labels, bias=bias.double(), **kw)
    assert_close(out, ref.detach(), dtype=torch.float32 if hidden.dtype == torch.float32 else hidden.dtype,
                 baseline=None if hidden.dtype == torch.float32 else
                 linear_cross_entropy_ref(hidden, weight, labels, bias=bias, **kw).detach().float(), name="loss")
    g = torch.autograd.grad(out, hidden)[0]
    r = torch.autograd.grad(ref, h64)[0]
    h16 = hidden.detach().clone().requires_grad_()
    base = None if hidden.dtype == torch.float32 else torch.autograd.grad(
        linear_cross_entropy_ref(h16, weight, labels, bias=bias, **kw), h16)[0]
    assert_close(g, r, dtype=hidden.dtype, baseline=base, name="grad_hidden")


def test_gradient_written_over_its_fp32_logits_in_bf16():
    """The gradient kernel writes a 16-bit g over the first half of each fp32 logits row, in place: every row comes
    out as computed from the logits it held (the interpreter truncates fp32 -> bf16 instead of rounding, so the
    reference is truncated too, and one bf16 ulp is allowed)."""
    from sftfuse.kernels import cross_entropy_triton as kt

    n, V = 5, 3001  # three 1024-wide tiles, the last partial: later tiles read logits after earlier ones wrote g
    ldz = -(-V // 16) * 16
    z = randn(n, ldz, scale=3.0)
    y, lse = torch.randint(0, V, (n,)), torch.logsumexp(z[:, :V], 1)
    rw = torch.rand(n) + 0.5
    want = (torch.softmax(z[:, :V].double(), 1) * rw[:, None]).float()
    want[torch.arange(n), y] -= rw
    g = z.view(torch.bfloat16)[:, :V]
    kt._lce_grad_kernel[(n,)](z, g, y, lse, rw, n, V, z.stride(0), g.stride(0), 0.0, 0.0, 0.0, 1.0, BLOCK_N=1024)
    trunc = (want.view(torch.int32) & ~0xFFFF).view(torch.float32)  # fp32 -> bf16 by truncation, as interpreted
    ulp = trunc.abs() * 2.0**-7 + 1e-30
    assert ((g.float() - trunc).abs() <= ulp).all()


class _CountSyncs(TorchDispatchMode):
    """Counts the ops that make the host wait for the device."""

    SYNCS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten.item")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(str(func).startswith(s) for s in self.SYNCS):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_triton_path_syncs_once_per_loss(monkeypatch, frozen):
    """Triton path, loss + backward with num_items_in_batch a tensor: one host sync (the counted rows' nonzero), no
    label-range check, no .item() on the count, no data-dependent branch in the backward."""
    monkeypatch.setenv("SFTFUSE_BACKEND", "triton")
    hidden, weight, _, labels = _inputs((2, 37), 64, 1031, torch.float32, masked=0.5)
    weight.requires_grad_(not frozen)
    n_items = torch.tensor(float((labels != -100).sum() + 3))
    with _CountSyncs() as mode:
        loss = linear_cross_entropy(hidden, weight, labels, num_items_in_batch=n_items, shift_labels=True)
        grads = torch.autograd.grad(loss, [hidden] if frozen else [hidden, weight])
    assert mode.seen == ["aten.nonzero.default"], mode.seen
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_(not frozen)
    ref = linear_cross_entropy_ref(h64, w64, labels, num_items_in_batch=float(n_items), shift_labels=True)
    assert_close(loss, ref.detach(), dtype=torch.float32)
    for g, r in zip(grads, torch.autograd.grad(ref, [h64] if frozen else [h64, w64])):
        assert_close(g, r, dtype=torch.float32)


def test_triton_path_gives_nan_for_labels_out_of_range(monkeypatch):
    """No host check on the Triton path: a label >= V (or < 0, not ignore_index) makes that token's loss NaN, so
    the loss shows it instead of silently counting the label as absent."""
    monkeypatch.setenv("SFTFUSE_BACKEND", "triton")
    hidden, weight, _, labels = _inputs((9,), 64, 100, torch.float32, masked=0.0)
    labels[3], labels[5] = 100, -5
    per = linear_cross_entropy(hidden, weight, labels, reduction="none")
    assert per[3].isnan() and per[5].isnan() and torch.isfinite(per[[0, 1, 2, 4, 6, 7, 8]]).all()
    assert linear_cross_entropy(hidden, weight, labels).isnan()


@pytest.mark.parametrize("bad, match", [
    ({"reduction": "avg"}, "reduction"), ({"label_smoothing": 1.5}, "label_smoothing"),
    ({"softcap": 0.0}, "softcap"), ({"num_items_in_batch": 5, "reduction": "sum"}, "num_items_in_batch"),
])
def test_bad_options_are_refused(bad, match):
    hidden, weight, _, labels = _inputs((4,), 64, 100, torch.float32)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(hidden, weight, labels, **bad)


def test_bad_inputs_are_refused():
    hidden, weight, _, labels = _inputs((4,), 64, 100, torch.float32)
    with pytest.raises(ValueError, match="labels must be in"):
        linear_cross_entropy(hidden, weight, torch.full((4,), 100))
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, weight[:, :10], labels)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(hidden, weight, labels.float())
