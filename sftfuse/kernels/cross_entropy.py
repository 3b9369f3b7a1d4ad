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
- PyTorch (CPU, and the specification): counted rows in chunks of 256, gathered one chunk at a time; each chunk's
  logits formed one (rows x vocab-tile) tile at a time in one reused fp32 buffer, the tiles sized by a 1.75 MiB budget
  (`_config`; a cast bf16 weight slice comes on top). A first pass keeps an online log-sum-exp; a second recomputes
  each tile, turns it into its logit gradient in place and accumulates dh (per chunk, written into the (N, H)
  gradient), dW and db (fp32) from it, so the backward only scales them by grad_output. A head small enough for one
  tile is computed once. The cost of tiling is one extra logits GEMM (8 n H V FLOPs instead of 6), the price of
  holding only the outputs: at the SmolLM2 head, 2048 tokens, fp32, peak memory is 0.0995x eager's and time 0.57-0.61x
  (bench/). A frozen head (LoRA: only dh wanted) takes one pass: dh is accumulated beside the log-sum-exp, as
  flash attention accumulates its output, and finished with each row's lse, so the logits are formed once
  (4 n H V FLOPs; the SmolLM2 head at 512 counted rows: 364 ms -> 246 ms on 2 cores). GEMMs run in the weight's
  dtype, or in fp32 where that is faster on this CPU (`sftfuse.kernels._cpu`).
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

# Bytes of working buffers the PyTorch path may hold beyond its outputs: one (rows x vocab-tile) fp32 logits
# tile (+ a copy for softcap, + the GEMM-dtype tile) and the row chunk's hidden rows and gradient. The SmolLM2
# head's outputs (fp32 dW 113 MB, dh 4.7 MB at 2048 tokens) are 0.098x of eager's 1.2 GB peak; the buffers add
# 1.5% of that. Measured on 2 cores: 256 x 640 tiles ran as fast as 256 x 896, 10% faster than 128 x 896.
_TORCH_BUDGET = 7 << 18  # 1.75 MiB (a cast weight slice comes on top: `_config`)
_ROWS = 256  # rows per chunk when the vocabulary must be tiled: K of the weight-gradient GEMM


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


def _config(V: int, H: int, *, n: int, gemm_bytes: int, weight_cast: bool, softcap: bool,
            budget: int = _TORCH_BUDGET) -> tuple[int, int]:
    """(rows, vocab tile) of the PyTorch path, so that its working buffers fit `budget` bytes.

    Per tile element: 4 (fp32 logits) + 4 with softcap + gemm_bytes when the GEMM dtype is not fp32; per row
    2 x 4 H (the chunk's hidden rows and its gradient). The whole vocabulary in one tile (one logits GEMM, no
    recompute) when >= _ROWS rows fit, the weight's cast included. When weight slices are cast for the GEMM
    (a bf16 head with fp32 GEMMs), the cast slice, cols x 4 H bytes, comes on top of the budget: counted in
    it, the SmolLM2 head's tile shrank from 640 to 192 columns and the loss + gradient took 448 ms instead of
    370 (508 rows, 2 cores), for 1.5 MB.
    """
    per = 4 + (4 if softcap else 0) + (0 if gemm_bytes == 4 else gemm_bytes)
    rows = max(1, min(n, _ROWS))
    row_bytes = 8 * H
    whole = (budget - (4 * H * V if weight_cast else 0)) // (per * V + row_bytes)
    if whole >= min(n, _ROWS):
        return max(1, min(n, whole, 4096)), V
    cols = (budget - rows * row_bytes) // (rows * per)
    return rows, max(64, cols // 64 * 64)


def linear_cross_entropy_torch(h, weight, bias, y, row_weight=None, *, rows_idx=None, label_smoothing=0.0,
                               z_loss=0.0, softcap=None, logit_scale=1.0, need_dh=True, need_dw=True, need_db=True,
                               tiles=None):
    """PyTorch path: per-row loss, lse and hit of the counted rows, and (with row_weight) weighted gradients.

    Rows are taken `rows` at a time; each chunk's logits are formed one (rows x vocab-tile) tile at a time into
    one reused fp32 buffer. With more than one vocabulary tile a first pass keeps an online log-sum-exp (running
    max and rescaled sum) and a second recomputes each tile to form its gradient; with one tile, the tile is
    computed once. Gradients are accumulated in fp32 as they are formed: dh per chunk, dW and db per tile.

    Args:
        h: (N, H) hidden rows. rows_idx: (n,) int64 indices of the counted rows in h, or None (all N counted).
        weight: (V, H). bias: (V,) or None. y: (n,) int64 labels in [0, V) of the counted rows.
        row_weight: (n,) fp32 weight r_i of each row's loss in the gradient, or None for no gradient.
        tiles: (rows, vocab tile) to use instead of `_config`'s choice (tests).
    Returns:
        loss (n,) fp32 (unweighted), lse (n,) fp32, hit (n,) bool (target logit is the max), and dh (N, H) fp32
        (zero on rows not counted), dW (V, H) fp32, db (V,) fp32 (None where not asked for).
    """
    from sftfuse.kernels._cpu import gemm_dtype

    N, H = h.shape
    n, V = y.shape[0], weight.shape[0]
    cd = gemm_dtype(weight.dtype, h.device)  # GEMM dtype: the weight's, or fp32 where that is faster here
    f32 = {"dtype": torch.float32, "device": h.device}
    loss, lse, hit = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, dtype=torch.bool, device=h.device)
    grads = row_weight is not None
    dh = torch.zeros(N, H, **f32) if grads and need_dh else None
    dw = torch.empty(V, H, **f32) if grads and need_dw else None  # the first row chunk writes it (beta=0)
    db = torch.zeros(V, **f32) if grads and need_db else None
    if n == 0:
        return loss, lse, hit, dh, None if dw is None else dw.zero_(), db
    rows, cols = tiles or _config(V, H, n=n, gemm_bytes=torch.finfo(cd).bits // 8,
                                  weight_cast=weight.dtype != cd, softcap=softcap is not None)
    rows, cols = min(rows, n), min(cols, V)
    single = cols == V
    zflat = torch.empty(rows * cols, **f32)
    lflat = torch.empty(rows * cols, dtype=cd, device=h.device) if cd != torch.float32 else None
    tflat = torch.empty(rows * cols, **f32) if softcap is not None else None
    wbuf = torch.empty(cols, H, dtype=cd, device=h.device) if weight.dtype != cd and not single else None
    wfull = weight.to(cd) if weight.dtype != cd and single else weight  # one tile: the whole (small) head
    eps = label_smoothing
    # The chunk's rows (gathered, in the GEMM dtype) and their gradient: one buffer each, reused by every chunk.
    hbuf = torch.empty(rows, H, dtype=cd, device=h.device) if rows_idx is not None or h.dtype != cd else None
    dhbuf = torch.empty(rows, H, **f32) if dh is not None else None

    # One pass when only dh is asked for (a frozen head: LoRA SFT): flash-attention style, dh_i = sum_v g_iv W_v is
    # accumulated as acc_i = sum_v exp(z_iv - m_i) f_iv W_v (f = d z / d a), rescaled as the running max m_i grows,
    # and finished with the row's lse: 4 n H V FLOPs instead of 6 (no logits recompute). Label smoothing's
    # -eps/V sum_v f_iv W_v term is a constant (the weight's column sum) only without softcap.
    online = grads and dh is not None and dw is None and db is None and not single and not (eps and softcap)
    wsum = None
    if online and eps:
        wsum = torch.zeros(H, **f32)
        for v0 in range(0, V, cols):
            wsum += weight[v0:v0 + cols].sum(0, dtype=torch.float32)

    def logits(hc, v0, v1):
        """z = softcap(s * (hc W[v0:v1]^T + b[v0:v1])) into the fp32 buffer, (c, v1 - v0); tanh kept in t."""
        c, w = hc.shape[0], v1 - v0
        z = zflat[: c * w].view(c, w)
        wt = wfull[v0:v1] if wbuf is None else wbuf[:w].copy_(weight[v0:v1])
        out = z if lflat is None else lflat[: c * w].view(c, w)
        if bias is not None:
            torch.addmm(bias[v0:v1].to(cd), hc, wt.t(), out=out)
        else:
            torch.mm(hc, wt.t(), out=out)
        if lflat is not None:
            z.copy_(out)
        if logit_scale != 1.0:
            z.mul_(logit_scale)
        t = None
        if softcap is not None:
            t = tflat[: c * w].view(c, w)
            torch.div(z, softcap, out=t).tanh_()
            torch.mul(t, softcap, out=z)
        return z, t, wt, out

    def add_dh(dhc, z, wt, out):
        """dhc (c, H) fp32 += z wt, z taken through the GEMM-dtype buffer `out` when there is one."""
        if out is None:
            dhc.addmm_(z, wt)
        else:
            dhc += torch.mm(out.copy_(z), wt)

    def store_dh(s, e, dhc):
        """The chunk's rows of dh into the (N, H) gradient (at their rows in h when only some are counted)."""
        if rows_idx is None:
            dh[s:e] = dhc
        else:
            dh.index_copy_(0, rows_idx[s:e], dhc)

    for s in range(0, n, rows):
        e = min(s + rows, n)
        c = e - s
        if hbuf is None:
            hc = h[s:e]
        elif rows_idx is None:
            hc = hbuf[:c].copy_(h[s:e])
        else:
            hc = torch.index_select(h, 0, rows_idx[s:e], out=hbuf[:c]) if h.dtype == cd else \
                hbuf[:c].copy_(h.index_select(0, rows_idx[s:e]))
        yc = y[s:e]
        zmax = torch.full((c,), float("-inf"), **f32)
        ssum, zy = torch.zeros(c, **f32), torch.zeros(c, **f32)
        zsum = torch.zeros(c, **f32) if eps else None
        dhc = dhbuf[:c].zero_() if dh is not None else None  # online: sum_v exp(z - max) f W_v as it goes
        for v0 in range(0, V, cols):  # pass 1: online log-sum-exp over vocabulary tiles
            v1 = min(v0 + cols, V)
            z, t, wt, out = logits(hc, v0, v1)
            inside = (yc >= v0) & (yc < v1)
            zy += torch.where(inside, z.gather(1, (yc - v0).clamp_(0, v1 - v0 - 1)[:, None]).squeeze(1), 0.0)
            if eps:
                zsum += z.sum(1)
            m_new = torch.maximum(zmax, z.amax(1))
            alpha = (zmax - m_new).exp_()
            ssum.mul_(alpha)
            zmax = m_new
            ssum += z.sub_(zmax[:, None]).exp_().sum(1)  # z now holds exp(z - max): kept when single
            if online:
                dhc.mul_(alpha[:, None])
                if softcap is not None:
                    z.mul_(t.square_().neg_().add_(1.0))
                add_dh(dhc, z, wt, out)
        lc = ssum.log().add_(zmax)  # (c,) log-sum-exp
        lse[s:e] = lc
        hit[s:e] = zy >= zmax
        lossc = (lc - zy) * (1.0 - eps) + z_loss * lc.square()
        if eps:
            lossc += eps * (lc - zsum / V)
        loss[s:e] = lossc
        if not grads:
            continue
        r = row_weight[s:e] * logit_scale
        coef = r * (1.0 + 2.0 * z_loss * lc)
        if online:  # dh = coef softmax f W - (1 - eps) r f_y W_y - r eps / V sum_v W_v
            fy = 1.0 - (zy / softcap).square() if softcap is not None else torch.ones_like(zy)
            dhc.mul_((coef / ssum)[:, None])
            dhc.sub_(weight.index_select(0, yc).float().mul_((r * (1.0 - eps) * fy)[:, None]))
            if eps:
                dhc.sub_(torch.outer(r * (eps / V), wsum))
            store_dh(s, e, dhc)
            continue
        # exp(z - lse) * coef as one exp of z - (lse - log coef): one pass over each tile fewer (coef >= 0 here
        # unless a negative z-loss makes it negative; log 0 = -inf gives exp = 0, as it should)
        shift = (lc - coef.log())[:, None] if bool((coef >= 0).all()) else None
        for v0 in range(0, V, cols):  # pass 2: each tile's logit gradient, then its share of dh, dW and db
            v1 = min(v0 + cols, V)
            if single:  # the tile still holds exp(z - max)
                z, wt, out = zflat[: c * V].view(c, V), wfull, None if lflat is None else lflat[: c * V].view(c, V)
                t = None if tflat is None else tflat[: c * V].view(c, V)
                z.mul_((coef / ssum)[:, None])  # r (1 + 2 z_loss lse) softmax
            else:
                z, t, wt, out = logits(hc, v0, v1)
                if shift is not None:
                    z.sub_(shift).exp_()
                else:
                    z.sub_(lc[:, None]).exp_().mul_(coef[:, None])
            if eps:
                z.sub_((r * (eps / V))[:, None])
            inside = (yc >= v0) & (yc < v1)
            z.scatter_add_(1, (yc - v0).clamp_(0, v1 - v0 - 1)[:, None],
                           torch.where(inside, r * (eps - 1.0), 0.0)[:, None])
            if softcap is not None:
                z.mul_(t.square_().neg_().add_(1.0))  # d tanh = 1 - tanh^2
            if dhc is not None:
                add_dh(dhc, z, wt, out)
            if dw is not None:  # fp32 GEMM from the fp32 gradient: exact accumulation, no (V, H) temporary
                torch.addmm(dw[v0:v1], z.t(), hc if cd == torch.float32 else hc.float(), out=dw[v0:v1],
                            beta=1 if s else 0)
            if db is not None:
                db[v0:v1] += z.sum(0)
        if dhc is not None:
            store_dh(s, e, dhc)
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
