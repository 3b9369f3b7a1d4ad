"""Linear + cross-entropy over the vocabulary, chunked and masked: the (tokens x V) logits never exist.

Math, per counted token i (label y_i != ignore_index) with hidden row h_i (H,), weight W (V, H), bias b (V,):
    a_i = W h_i + b;  z_i = s * a_i, then z_i = cap * tanh(z_i / cap) when softcap is set      (V,)
    lse_i = log sum_v exp(z_iv)
    loss_i = (1 - eps) (lse_i - z_iy) + eps (lse_i - mean_v z_iv) + z_loss * lse_i^2
which is F.cross_entropy(z, y, label_smoothing=eps) plus a z-loss. The loss is sum_i r_i loss_i with a row
weight r_i (1 / count for "mean", 1 / num_items_in_batch when given, 1 for "sum"). Its gradient:
    g_i = dloss/dz_i = r_i [ (1 + 2 z_loss lse_i) softmax(z_i) - (1 - eps) onehot(y_i) - eps / V ]
    da_i = s * g_i * (1 - (z_i / cap)^2 if softcap)
    dh_i = W^T da_i,   dW = sum_i da_i h_i^T,   db = sum_i da_i
Masked rows are dropped before any matmul (gathered away), so prompt tokens cost neither FLOPs nor memory.

Memory saved: 2048 tokens x 49,152 vocab in fp32 is 403 MB of logits, and eager autograd keeps about three
such buffers (logits, log-softmax, their gradient): 1.5 GB. At 16k tokens x 128,256 vocab the logits alone are
8.4 GB. Here only the fp32 weight gradient (V x H, the output itself) and one chunk are held.

Two paths, one algorithm:
- PyTorch (CPU, and the specification): tokens in chunks of `_config()` rows, sized from V and a memory budget.
  Each chunk's logits go into one reused fp32 buffer; the softmax and then the logit gradient are written in place
  into it, and the gradients are accumulated (fp32) in the same pass, so the backward only scales them by
  grad_output. The logits and grad_hidden matmuls run in the input dtype (bf16 is up to ~4x faster than fp32 on
  AVX512-BF16 CPUs); the weight gradient is one fp32 addmm per chunk from the fp32 logit gradient straight into
  the fp32 accumulator (a bf16 product would need a (V, H) temporary or slow sliced GEMMs).
- Triton (CUDA): the forward kernel fuses the matmul with an online log-sum-exp over vocabulary tiles; logit
  tiles live in registers only (loss memory is O(tokens)). The backward kernel recomputes each (rows x vocab) tile
  once and emits both gradients from it with fp32 atomic adds (dh over vocab tiles, dW over row tiles): one
  recompute of the logits (8 n V H FLOPs in total, vs. H / BLOCK_K recomputes for a kernel that owns its output
  tiles), at the price of run-to-run bit differences in the last ulp. Gradient filtering (skip a tile whose
  gradient entries are all below `filter_eps`) is off by default: it is exact only without label smoothing.
Offsets are int64 in the kernels (tokens x V and V x H exceed 2^31 for real heads). The largest H is not limited
(H is looped over in BLOCK_K steps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sftfuse.kernels._registry import (
    CheckResult,
    KernelSpec,
    interpreter_active,
    max_error,
    register_check,
    register_kernel,
    tolerance,
)

# Bytes of chunk buffers the PyTorch path may hold (logits chunk + a low-precision copy + the softcap buffer).
_TORCH_BUDGET = 24 << 20


def linear_cross_entropy_ref(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                             label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
                             num_items_in_batch=None, shift_labels=False, upcast=False):
    """The oracle: full logits, F.cross_entropy and autograd (fp64 with upcast=True).

    Args:
        hidden: (..., H). weight: (V, H). labels: (...) int64. bias: (V,) or None.
    Returns:
        0-dim loss, or (...) per-token losses (0 where ignored) for reduction="none".
    """
    if upcast:
        hidden, weight = hidden.double(), weight.double()
        bias = bias.double() if bias is not None else None
    if shift_labels:
        labels = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], ignore_index)], dim=-1)
    z = F.linear(hidden, weight, bias) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z, y = z.reshape(-1, z.shape[-1]), labels.reshape(-1)
    per = F.cross_entropy(z, y, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    mask = y != ignore_index
    if z_loss:
        per = per + z_loss * torch.logsumexp(z, -1).square() * mask
    if reduction == "none":
        return per.reshape(labels.shape)
    if reduction == "sum":
        return per.sum()
    denom = num_items_in_batch if num_items_in_batch is not None else mask.sum()
    return per.sum() / max(float(denom), 1.0)


def _config(V: int, *, low_precision: bool, softcap: bool, budget: int = _TORCH_BUDGET) -> int:
    """Rows per chunk of the PyTorch path: the chunk buffers (fp32 logits, + a bf16 copy, + softcap) fit `budget`."""
    per_row = V * (4 + (2 if low_precision else 0) + (4 if softcap else 0))
    return max(8, min(4096, budget // per_row // 8 * 8))


def linear_cross_entropy_torch(h, weight, bias, y, row_weight=None, *, label_smoothing=0.0, z_loss=0.0,
                               softcap=None, logit_scale=1.0, need_dh=True, need_dw=True, need_db=True,
                               chunk_rows=None):
    """PyTorch path on counted rows only: per-row loss, lse and hit, and (with row_weight) weighted gradients.

    Args:
        h: (n, H) counted hidden rows. weight: (V, H). bias: (V,) or None. y: (n,) int64 labels in [0, V).
        row_weight: (n,) fp32 weight r_i of each row's loss in the gradient, or None for no gradient.
    Returns:
        loss (n,) fp32 (unweighted), lse (n,) fp32, hit (n,) bool (target logit is the max), and dh (n, H),
        dW (V, H), db (V,) in fp32 (None where not asked for).
    """
    n, H = h.shape
    V = weight.shape[0]
    low = weight.dtype != torch.float32
    f32 = {"dtype": torch.float32, "device": h.device}
    loss, lse, hit = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, dtype=torch.bool, device=h.device)
    grads = row_weight is not None
    dh = torch.empty(n, H, **f32) if grads and need_dh else None
    dw = torch.zeros(V, H, **f32) if grads and need_dw else None
    db = torch.zeros(V, **f32) if grads and need_db else None
    rows = chunk_rows or _config(V, low_precision=low, softcap=softcap is not None)
    rows = min(rows, max(n, 1))
    buf = torch.empty(rows, V, **f32)
    lbuf = torch.empty(rows, V, dtype=weight.dtype, device=h.device) if low else None
    tbuf = torch.empty(rows, V, **f32) if softcap is not None else None
    wt = weight.t()
    eps = label_smoothing
    for s in range(0, n, rows):
        e = min(s + rows, n)
        hc, yc, z = h[s:e], y[s:e, None], buf[: e - s]  # z: (c, V) fp32
        mm_out = lbuf[: e - s] if low else z
        if bias is not None:
            torch.addmm(bias, hc, wt, out=mm_out)
        else:
            torch.mm(hc, wt, out=mm_out)
        if low:
            z.copy_(mm_out)
        if logit_scale != 1.0:
            z.mul_(logit_scale)
        if softcap is not None:
            t = tbuf[: e - s]
            torch.div(z, softcap, out=t).tanh_()
            torch.mul(t, softcap, out=z)
        zy = z.gather(1, yc).squeeze(1)
        zmax = z.amax(1)
        hit[s:e] = zy >= zmax
        zmean = z.mean(1) if eps else None
        z.sub_(zmax[:, None]).exp_()  # z now holds exp(z - max)
        ssum = z.sum(1)
        lc = ssum.log().add_(zmax)  # (c,) log-sum-exp
        lse[s:e] = lc
        lossc = (lc - zy) * (1.0 - eps) + z_loss * lc.square()
        if eps:
            lossc += eps * (lc - zmean)
        loss[s:e] = lossc
        if not grads:
            continue
        r = row_weight[s:e] * logit_scale
        z.mul_((r * (1.0 + 2.0 * z_loss * lc) / ssum)[:, None])  # r (1 + 2 z_loss lse) softmax
        if eps:
            z.sub_((r * (eps / V))[:, None])
        z.scatter_add_(1, yc, (r * (eps - 1.0))[:, None])
        if softcap is not None:
            z.mul_(t.square_().neg_().add_(1.0))  # d tanh = 1 - tanh^2
        g = mm_out.copy_(z) if low else z  # (c, V) logit gradient in the matmul dtype
        if dh is not None:
            if low:
                dh[s:e] = torch.mm(g, weight)
            else:
                torch.mm(g, weight, out=dh[s:e])
        if dw is not None:  # fp32 GEMM from the fp32 gradient: exact accumulation and no (V, H) temporary
            torch.addmm(dw, z.t(), hc.float() if low else hc, out=dw)
        if db is not None:
            db += z.sum(0)
    return loss, lse, hit, dh, dw, db


# ---------------------------------------------------------------------------------------------------------------
# Triton path

@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))  # in (0, 1]: no overflow for either sign
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, offs_m, offs_n, n_rows, V, H, stride_hm, stride_wv, has_bias, logit_scale,
                 softcap, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 UPCAST: tl.constexpr, FP32: tl.constexpr):
    """z = softcap(s * (h W^T + b)) for one (BLOCK_M, BLOCK_N) tile, fp32, in registers."""
    offs_k = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm  # int64: rows x H may pass 2^31
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wv
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(h_rows + kk[None, :], mask=(offs_m[:, None] < n_rows) & (kk[None, :] < H), other=0.0)
        w = tl.load(w_rows + kk[None, :], mask=(offs_n[:, None] < V) & (kk[None, :] < H), other=0.0)
        if UPCAST:  # the interpreter computes bf16 arithmetic wrongly: fp32 there
            a, w = a.to(tl.float32), w.to(tl.float32)
        if FP32:  # fp32 inputs: tf32x3 (three tf32 products: ~fp32 accuracy on tensor cores)
            acc = tl.dot(a, tl.trans(w), acc, input_precision="tf32x3")
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    if has_bias:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < V, other=0.0).to(tl.float32)[None, :]
    acc = acc * logit_scale
    if softcap > 0:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _lce_fwd_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, y_ptr, loss_ptr, lse_ptr, hit_ptr,
    # sizes and strides (inner strides are 1)
    n_rows, V, H, stride_hm, stride_wv,
    # flags and options
    has_bias, label_smoothing, z_loss, softcap, logit_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_rows
    y = tl.load(y_ptr + offs_m, mask=row_ok, other=0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    z_y = tl.zeros((BLOCK_M,), tl.float32)
    z_sum = tl.zeros((BLOCK_M,), tl.float32)
    for v0 in range(0, V, BLOCK_N):  # online log-sum-exp over vocabulary tiles; tiles never leave registers
        offs_n = v0 + tl.arange(0, BLOCK_N)
        z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_m, offs_n, n_rows, V, H, stride_hm, stride_wv, has_bias,
                         logit_scale, softcap, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, FP32)
        col_ok = (offs_n < V)[None, :]
        z_sum += tl.sum(tl.where(col_ok, z, 0.0), 1)
        z_y += tl.sum(tl.where(offs_n[None, :] == y[:, None], z, 0.0), 1)
        z = tl.where(col_ok, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    loss = (1.0 - label_smoothing) * (lse - z_y) + label_smoothing * (lse - z_sum / V) + z_loss * lse * lse
    tl.store(loss_ptr + offs_m, loss, mask=row_ok)
    tl.store(lse_ptr + offs_m, lse, mask=row_ok)
    tl.store(hit_ptr + offs_m, (z_y >= m_i).to(tl.int8), mask=row_ok)


@triton.jit
def _lce_bwd_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, rw_ptr, dh_ptr, dw_ptr, db_ptr,
    # sizes and strides (inner strides are 1; dh and dw are contiguous fp32)
    n_rows, V, H, stride_hm, stride_wv,
    # flags and options
    has_bias, label_smoothing, z_loss, softcap, logit_scale, filter_eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, FP32: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = offs_m < n_rows, offs_n < V
    z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_m, offs_n, n_rows, V, H, stride_hm, stride_wv, has_bias,
                     logit_scale, softcap, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, FP32)
    y = tl.load(y_ptr + offs_m, mask=row_ok, other=0)
    lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
    r = tl.load(rw_ptr + offs_m, mask=row_ok, other=0.0) * logit_scale  # 0 on padding rows
    g = tl.exp(z - lse[:, None]) * (r * (1.0 + 2.0 * z_loss * lse))[:, None] - (r * (label_smoothing / V))[:, None]
    g -= tl.where(offs_n[None, :] == y[:, None], (r * (1.0 - label_smoothing))[:, None], 0.0)
    if softcap > 0:
        t = z / softcap
        g = g * (1.0 - t * t)
    g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
    if has_bias:
        tl.atomic_add(db_ptr + offs_n, tl.sum(g, 0), mask=col_ok)
    if tl.max(tl.max(tl.abs(g), 1), 0) >= filter_eps:  # filter_eps = 0 (default) never skips
        gd = g if UPCAST else g.to(w_ptr.dtype.element_ty)
        offs_k = tl.arange(0, BLOCK_K)
        m64, n64 = offs_m.to(tl.int64)[:, None], offs_n.to(tl.int64)[:, None]
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + offs_k
            k_ok = (kk < H)[None, :]
            w = tl.load(w_ptr + n64 * stride_wv + kk[None, :], mask=col_ok[:, None] & k_ok, other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            if FP32:
                dh = tl.dot(gd, w, input_precision="tf32x3")
            else:
                dh = tl.dot(gd, w)
            tl.atomic_add(dh_ptr + m64 * H + kk[None, :], dh, mask=row_ok[:, None] & k_ok)
            if COMPUTE_DW:
                a = tl.load(h_ptr + m64 * stride_hm + kk[None, :], mask=row_ok[:, None] & k_ok, other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                if FP32:
                    dw = tl.dot(tl.trans(gd), a, input_precision="tf32x3")
                else:
                    dw = tl.dot(tl.trans(gd), a)
                tl.atomic_add(dw_ptr + n64 * H + kk[None, :], dw, mask=col_ok[:, None] & k_ok)


def _triton_config(dtype: torch.dtype, kernel: str, *, interpret: bool | None = None) -> dict:
    """Block sizes and launch options. The interpreter gets small fp32 tiles (and several K steps at H=64)."""
    if interpret if interpret is not None else interpreter_active():
        return {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 32, "UPCAST": True, "FP32": False, "num_warps": 4,
                "num_stages": 1}
    # Picked with the compile check: no spills on sm_80/sm_90, tensor-core MMA (tf32x3 for fp32) and cp.async.
    if dtype == torch.float32:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "UPCAST": False, "FP32": True, "num_warps": 8}
        return {**cfg, "BLOCK_K": 32, "num_stages": 3} if kernel == "fwd" else {**cfg, "BLOCK_K": 16, "num_stages": 2}
    cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "UPCAST": False, "FP32": False, "num_warps": 8}
    return {**cfg, "BLOCK_K": 64, "num_stages": 3} if kernel == "fwd" else {**cfg, "BLOCK_K": 32, "num_stages": 2}


def _empty(*shape, **kw) -> torch.Tensor:
    return torch.empty(*shape, **kw)  # one place for tests to poison every launcher output


def _check_inputs(h, weight, bias, y):
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"h (n, H) and weight (V, H) expected, got {tuple(h.shape)} and {tuple(weight.shape)}")
    if h.dtype != weight.dtype or h.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"h and weight need one dtype and unit inner stride, got {h.dtype}, {weight.dtype}")
    if y.shape != h.shape[:1] or y.dtype != torch.int64:
        raise ValueError(f"y must be int64 of shape ({h.shape[0]},), got {y.dtype} {tuple(y.shape)}")
    if bias is not None and (bias.shape != weight.shape[:1] or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous of shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def linear_cross_entropy_fwd(h, weight, bias, y, *, label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0):
    """Triton forward on counted rows: h (n, H), weight (V, H), y (n,) -> loss (n,), lse (n,) fp32, hit (n,) bool."""
    _check_inputs(h, weight, bias, y)
    (n, H), V = h.shape, weight.shape[0]
    loss, lse = _empty(n, dtype=torch.float32, device=h.device), _empty(n, dtype=torch.float32, device=h.device)
    hit = _empty(n, dtype=torch.int8, device=h.device)
    if n:
        cfg = _triton_config(h.dtype, "fwd")
        _lce_fwd_kernel[(triton.cdiv(n, cfg["BLOCK_M"]),)](
            h, weight, h if bias is None else bias, y, loss, lse, hit, n, V, H, h.stride(0), weight.stride(0),
            bias is not None, float(label_smoothing), float(z_loss), float(softcap or 0.0), float(logit_scale),
            **cfg)
    return loss, lse, hit.bool()


def linear_cross_entropy_bwd(h, weight, bias, y, lse, row_weight, *, label_smoothing=0.0, z_loss=0.0, softcap=None,
                             logit_scale=1.0, need_dw=True, need_db=True, filter_eps=0.0, **_unused):
    """Triton backward: recomputes logit tiles; row_weight (n,) fp32 = dloss/dloss_i. Returns fp32 dh, dW, db.

    filter_eps > 0 skips the matmuls of tiles whose logit gradients are all below it (exact only when those
    entries are negligible: never with label smoothing, whose -eps/V term is in every entry).
    """
    _check_inputs(h, weight, bias, y)
    (n, H), V = h.shape, weight.shape[0]
    dh = torch.zeros(n, H, dtype=torch.float32, device=h.device)
    dw = torch.zeros(V, H, dtype=torch.float32, device=h.device) if need_dw else None
    db = torch.zeros(V, dtype=torch.float32, device=h.device) if need_db and bias is not None else None
    if n:
        cfg = _triton_config(h.dtype, "bwd")
        grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(V, cfg["BLOCK_N"]))
        _lce_bwd_kernel[grid](
            h, weight, h if bias is None else bias, y, lse, row_weight.float().contiguous(), dh,
            dh if dw is None else dw, dh if db is None else db, n, V, H, h.stride(0), weight.stride(0),
            bias is not None, float(label_smoothing), float(z_loss), float(softcap or 0.0), float(logit_scale),
            float(filter_eps), COMPUTE_DW=dw is not None, **cfg)
    return dh, dw, db


# ---------------------------------------------------------------------------------------------------------------
# Registrations: every configuration the launchers pick on a GPU, and the `sftfuse verify` numerics check.

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def _specs() -> list[KernelSpec]:
    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        p = _PTR[dtype]
        common = {"h_ptr": p, "w_ptr": p, "b_ptr": p, "y_ptr": "*i64", "n_rows": "i32", "V": "i32", "H": "i32",
                  "stride_hm": "i32", "stride_wv": "i32", "has_bias": "i1", "label_smoothing": "fp32",
                  "z_loss": "fp32", "softcap": "fp32", "logit_scale": "fp32"}
        meta = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "UPCAST", "FP32")
        cfg = _triton_config(dtype, "fwd", interpret=False)
        sig = {**common, "loss_ptr": "*fp32", "lse_ptr": "*fp32", "hit_ptr": "*i8", **{m: "constexpr" for m in meta}}
        sig = {a: sig[a] for a in _lce_fwd_kernel.arg_names}
        specs.append(KernelSpec(f"lce_fwd_{p[1:]}", _lce_fwd_kernel, sig, {m: cfg[m] for m in meta},
                                cfg["num_warps"], cfg["num_stages"], ("h_ptr", "w_ptr", "stride_hm", "stride_wv")))
        cfg = _triton_config(dtype, "bwd", interpret=False)
        sig = {**common, "lse_ptr": "*fp32", "rw_ptr": "*fp32", "dh_ptr": "*fp32", "dw_ptr": "*fp32",
               "db_ptr": "*fp32", "filter_eps": "fp32", **{m: "constexpr" for m in (*meta, "COMPUTE_DW")}}
        sig = {a: sig[a] for a in _lce_bwd_kernel.arg_names}
        for dw in (True, False):
            specs.append(KernelSpec(f"lce_bwd_{p[1:]}", _lce_bwd_kernel, sig,
                                    {**{m: cfg[m] for m in meta}, "COMPUTE_DW": dw}, cfg["num_warps"],
                                    cfg["num_stages"], ("h_ptr", "w_ptr", "dh_ptr", "dw_ptr", "stride_hm",
                                                        "stride_wv", "H")))
    return specs


register_kernel("cross_entropy", _specs)


def _verify(ctx) -> None:
    shapes = [(2048, 576, 49152), (512, 2048, 128256)] if ctx.large else [(37, 64, 1031), (5, 100, 4099)]
    for dtype in ctx.dtypes:
        for n, H, V in shapes:
            h = torch.randn(n, H, device=ctx.device).to(dtype)
            w = (torch.randn(V, H, device=ctx.device) / H**0.5).to(dtype)
            y = torch.randint(0, V, (n,), device=ctx.device)
            rw = torch.full((n,), 1.0 / n, device=ctx.device)
            loss, lse, _ = linear_cross_entropy_fwd(h, w, None, y)
            dh, dw, _ = linear_cross_entropy_bwd(h, w, None, y, lse, rw)
            hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
            ref = F.cross_entropy(hr @ wr.t(), y, reduction="none")
            ref_dh, ref_dw = torch.autograd.grad(ref.mean(), [hr, wr])
            for what, ours, want in (("loss", loss, ref), ("grad_hidden", dh, ref_dh), ("grad_weight", dw, ref_dw)):
                ctx.results.append(CheckResult(f"cross_entropy.{what}", "triton", str(dtype).split(".")[-1],
                                               f"{n}x{H}x{V}", max_error(ours, want), tolerance(want.detach(), dtype)))


register_check("cross_entropy", _verify)
