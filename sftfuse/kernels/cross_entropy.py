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

Two paths, one algorithm (this file: the reference and the PyTorch path; `cross_entropy_triton.py`: the Triton
kernels; `cross_entropy_launch.py`: their launchers and the op's one Triton-or-PyTorch decision):
- PyTorch (CPU, and the specification): counted rows in chunks of 256, gathered one chunk at a time; each chunk's
  logits formed one (rows x vocab-tile) tile at a time in one reused fp32 buffer, the tiles sized by a 1.75 MiB budget
  (`_config`; a cast bf16 weight slice comes on top). A first pass keeps an online log-sum-exp; a second recomputes
  each tile, turns it into its logit gradient in place and accumulates dh (straight into the (N, H) gradient's
  first rows, moved to the counted rows' places at the end: `_compact_dh`), dW and db (fp32) from it, so the
  backward only scales them by grad_output. A head small enough for one tile is computed once. The cost of
  tiling is one extra logits GEMM (8 n H V FLOPs instead of 6), the price of holding only the outputs: at the
  SmolLM2 head, 2048 tokens, fp32, peak memory is 0.098x eager's (the returned gradients alone are 0.0975x) and
  time 0.52-0.56x (bench/). A frozen head (LoRA: only dh wanted) takes one pass: dh is accumulated beside the
  log-sum-exp, as flash attention accumulates its output, and finished with each row's lse, so the logits are
  formed once (4 n H V FLOPs; the SmolLM2 head at 512 counted rows: 364 ms -> 246 ms on 2 cores). GEMMs run in the
  weight's dtype, or in fp32 where that is faster on this CPU (`sftfuse.kernels._cpu`).
- Triton (CUDA): the same algorithm at GPU scale (`cross_entropy_triton.py`, plan in `lce_plan`). Counted rows in
  chunks of 1024 (trained head) or 512 (frozen head), each chunk's fp32 logits (at most 1 GiB: 525 MB at 1024 rows x
  128,256) the only buffer of size tokens x V. Per chunk: the stats kernel forms the logits tile by tile over
  (row block x vocabulary slice) programs, enough for every SM, row blocks fastest so a slice's weight tiles are
  read once into L2, keeps the logits and each slice's online log-sum-exp; a merge of the slices (on the device);
  the gradient kernel turns the logits into dloss/dz in place (16-bit over the first half of each fp32 row); then
  dh = g W on cuBLAS and dW [+]= g^T h on a Triton GEMM that owns its output tiles. No atomics, each logit formed
  once (4 n H V FLOPs frozen, 6 trained, as Liger's chunked design, against 6 and 8 for recompute-in-the-backward
  designs such as CCE's), and no host sync. Cost: python -m sftfuse.kernels.roofline. Not done: CCE's gradient
  filtering (skipping tiles whose gradient is below bf16 resolution), which needs recomputing designs.
Offsets are int64 in the kernels (tokens x V and V x H exceed 2^31 for real heads). The largest H is not limited
(H is looped over in BLOCK_K steps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Bytes of working buffers the PyTorch path may hold beyond its outputs: one (rows x vocab-tile) fp32 logits
# tile (+ a copy for softcap, + the GEMM-dtype tile) and the row chunk's hidden rows and gradient. The budget
# sizes the tiles (the sizes measured fastest below); where the dh output has free rows, the buffers live there
# and the gradient rows are dh's own (`_compact_dh`). The SmolLM2 head's outputs (fp32 dW 113 MB, dh
# 4.7 MB at 2048 tokens) are 0.098x of eager's 1.2 GB peak; the buffers add 1.5% of that. Measured on 2 cores:
# 256 x 640 tiles ran as fast as 256 x 896, 10% faster than 128 x 896.
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


# ---------------------------------------------------------------------------------------------------------------
# PyTorch path


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


class _Space:
    """Working buffers carved from a free region (rows of the dh output that no chunk writes: `_compact_dh`), and
    allocated where it has no room left."""

    def __init__(self, free: torch.Tensor | None, device):
        self.bytes = None if free is None else free.reshape(-1).view(torch.uint8)
        self.at, self.device = 0, device

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        n = numel * dtype.itemsize
        if self.bytes is not None and self.at + n <= self.bytes.numel():
            out = self.bytes[self.at:self.at + n].view(dtype)
            self.at += -(-n // 64) * 64  # the next buffer 64-byte aligned, as torch's own
            return out
        return torch.empty(numel, dtype=dtype, device=self.device)


class _TileBuffers:
    """The PyTorch path's working buffers, reused by every row chunk and vocabulary tile, and the logits tile formed
    in them; carved from `space` where it has room (`_Space`).

    zflat: one (rows x cols) fp32 logits tile; lflat: its GEMM-dtype twin when GEMMs are not fp32; tflat:
    tanh(z / cap) with softcap; wbuf: a weight slice cast for the GEMM (one tile: the whole head, cast once, is
    wfull); hbuf: the chunk's rows, gathered and in the GEMM dtype. A chunk's gradient rows are written straight
    into dh.
    """

    def __init__(self, h, weight, bias, *, rows, cols, cd, softcap, logit_scale, gather, space: _Space):
        V, H = weight.shape
        self.weight, self.bias, self.cd, self.softcap, self.logit_scale = weight, bias, cd, softcap, logit_scale
        self.V, self.cols, self.single = V, cols, cols == V
        # The chunk's rows, gathered and in the GEMM dtype: one buffer, reused by every chunk.
        self.hbuf = space.take(rows * H, cd).view(rows, H) if gather or h.dtype != cd else None
        self.zflat = space.take(rows * cols, torch.float32)
        self.lflat = space.take(rows * cols, cd) if cd != torch.float32 else None
        self.tflat = space.take(rows * cols, torch.float32) if softcap is not None else None
        self.wbuf = space.take(cols * H, cd).view(cols, H) if weight.dtype != cd and not self.single else None
        self.wfull = weight.to(cd) if weight.dtype != cd and self.single else weight  # one tile: the whole head

    def chunk(self, h, rows_idx, s, e):
        """Counted rows [s, e) of h, (c, H) in the GEMM dtype (gathered at rows_idx[s:e] when given)."""
        c = e - s
        if self.hbuf is None:
            return h[s:e]
        if rows_idx is None:
            return self.hbuf[:c].copy_(h[s:e])
        return torch.index_select(h, 0, rows_idx[s:e], out=self.hbuf[:c]) if h.dtype == self.cd else \
            self.hbuf[:c].copy_(h.index_select(0, rows_idx[s:e]))

    def logits(self, hc, v0, v1):
        """z = softcap(s * (hc W[v0:v1]^T + b[v0:v1])) into the fp32 buffer, (c, v1 - v0); tanh kept in t.

        Returns (z, t or None, the weight slice in the GEMM dtype, the GEMM-dtype buffer or None)."""
        c, w = hc.shape[0], v1 - v0
        z = self.zflat[: c * w].view(c, w)
        wt = self.wfull[v0:v1] if self.wbuf is None else self.wbuf[:w].copy_(self.weight[v0:v1])
        out = z if self.lflat is None else self.lflat[: c * w].view(c, w)
        if self.bias is not None:
            torch.addmm(self.bias[v0:v1].to(self.cd), hc, wt.t(), out=out)
        else:
            torch.mm(hc, wt.t(), out=out)
        if self.lflat is not None:
            z.copy_(out)
        if self.logit_scale != 1.0:
            z.mul_(self.logit_scale)
        t = None
        if self.softcap is not None:
            t = self.tflat[: c * w].view(c, w)
            torch.div(z, self.softcap, out=t).tanh_()
            torch.mul(t, self.softcap, out=z)
        return z, t, wt, out

    def resident(self, c):
        """The one tile of a single-tile head as the first pass left it (exp(z - max)): (z, t, weight, buffer)."""
        V = self.V
        z, out = self.zflat[: c * V].view(c, V), None if self.lflat is None else self.lflat[: c * V].view(c, V)
        return z, None if self.tflat is None else self.tflat[: c * V].view(c, V), self.wfull, out

    @staticmethod
    def add_dh(dhc, z, wt, out):
        """dhc (c, H) fp32 += z wt, z taken through the GEMM-dtype buffer `out` when there is one."""
        if out is None:
            dhc.addmm_(z, wt)
        else:
            dhc += torch.mm(out.copy_(z), wt)


def _lse_pass(bufs: _TileBuffers, hc, yc, eps, online_dh):
    """Pass 1 over a chunk's vocabulary tiles: online log-sum-exp (running max zmax, and ssum = sum exp(z - zmax)
    rescaled as zmax grows), the label's logit zy and, with label smoothing, the logit sum zsum; (c,) fp32 each.

    online_dh: the one-pass frozen head's (c, H) accumulator of sum_v exp(z_v - zmax) f_v W_v (f = dz / da), rescaled
    with ssum; None otherwise. Each tile is left holding exp(z - zmax): a single tile's second pass starts there.
    """
    c, V, cols = hc.shape[0], bufs.V, bufs.cols
    f32 = {"dtype": torch.float32, "device": hc.device}
    zmax = torch.full((c,), float("-inf"), **f32)
    ssum, zy = torch.zeros(c, **f32), torch.zeros(c, **f32)
    zsum = torch.zeros(c, **f32) if eps else None
    for v0 in range(0, V, cols):
        v1 = min(v0 + cols, V)
        z, t, wt, out = bufs.logits(hc, v0, v1)
        inside = (yc >= v0) & (yc < v1)
        zy += torch.where(inside, z.gather(1, (yc - v0).clamp_(0, v1 - v0 - 1)[:, None]).squeeze(1), 0.0)
        if eps:
            zsum += z.sum(1)
        m_new = torch.maximum(zmax, z.amax(1))
        alpha = (zmax - m_new).exp_()
        ssum.mul_(alpha)
        zmax = m_new
        ssum += z.sub_(zmax[:, None]).exp_().sum(1)  # z now holds exp(z - max): kept when single
        if online_dh is not None:
            online_dh.mul_(alpha[:, None])
            if bufs.softcap is not None:
                z.mul_(t.square_().neg_().add_(1.0))
            bufs.add_dh(online_dh, z, wt, out)
    return zmax, ssum, zy, zsum


def _finish_online_dh(dhc, weight, yc, zy, ssum, r, coef, *, eps, softcap, wsum):
    """The one-pass frozen head's dh for a chunk, in place in its accumulator dhc (c, H):
    dh = coef softmax f W - (1 - eps) r f_y W_y - r eps / V sum_v W_v, with wsum = sum_v W_v (H,) fp32."""
    fy = 1.0 - (zy / softcap).square() if softcap is not None else torch.ones_like(zy)
    dhc.mul_((coef / ssum)[:, None])
    dhc.sub_(weight.index_select(0, yc).float().mul_((r * (1.0 - eps) * fy)[:, None]))
    if eps:
        dhc.sub_(torch.outer(r * (eps / weight.shape[0]), wsum))


def _grad_pass(bufs: _TileBuffers, hc, yc, lc, ssum, r, coef, *, eps, dhc, dw, db, first):
    """Pass 2 over a chunk's vocabulary tiles: each tile's logit gradient, formed in place, then its share of dh
    (into dhc), dW and db (fp32; the first row chunk writes dW, the others add to it).

    g = coef softmax(z) - (1 - eps) r onehot(y) - r eps / V, times d tanh with softcap; lc: the rows' lse (c,).
    """
    c, V, cols = hc.shape[0], bufs.V, bufs.cols
    # exp(z - lse) * coef as one exp of z - (lse - log coef): one pass over each tile fewer (coef >= 0 here
    # unless a negative z-loss makes it negative; log 0 = -inf gives exp = 0, as it should)
    shift = (lc - coef.log())[:, None] if bool((coef >= 0).all()) else None
    for v0 in range(0, V, cols):
        v1 = min(v0 + cols, V)
        if bufs.single:  # the tile still holds exp(z - max)
            z, t, wt, out = bufs.resident(c)
            z.mul_((coef / ssum)[:, None])  # r (1 + 2 z_loss lse) softmax
        else:
            z, t, wt, out = bufs.logits(hc, v0, v1)
            if shift is not None:
                z.sub_(shift).exp_()
            else:
                z.sub_(lc[:, None]).exp_().mul_(coef[:, None])
        if eps:
            z.sub_((r * (eps / V))[:, None])
        inside = (yc >= v0) & (yc < v1)
        z.scatter_add_(1, (yc - v0).clamp_(0, v1 - v0 - 1)[:, None],
                       torch.where(inside, r * (eps - 1.0), 0.0)[:, None])
        if bufs.softcap is not None:
            z.mul_(t.square_().neg_().add_(1.0))  # d tanh = 1 - tanh^2
        if dhc is not None:
            bufs.add_dh(dhc, z, wt, out)
        if dw is not None:  # fp32 GEMM from the fp32 gradient: exact accumulation, no (V, H) temporary
            torch.addmm(dw[v0:v1], z.t(), hc if bufs.cd == torch.float32 else hc.float(), out=dw[v0:v1],
                        beta=0 if first else 1)
        if db is not None:
            db[v0:v1] += z.sum(0)


def _compact_dh(dh, rows_idx):
    """Where the counted rows' gradients are formed, (n, H) fp32, and the rows of dh free for working buffers.

    The counted rows' gradients go, chunk by chunk, into dh's first n rows, and `_scatter_rows` moves them to their
    rows at the end, in place: no (rows, H) gradient buffer. dh's other N - n rows, which no chunk writes, hold the
    working buffers (the gathered rows, the logits tile: `_Space`) and are zeroed or overwritten by the scatter.
    In SFT, where prompt tokens are not counted, they all fit: the SmolLM2 head (fp32, 2048 tokens, half counted)
    then holds nothing beyond its outputs, and its extra memory went from 120.3-120.8 MB (0.0997x eager's) to
    118.5-118.6 MB (0.0981x) on an AMD Zen 5.
    Needs rows_idx ascending (as `nonzero` gives them); else the gradients are formed in a separate (n, H) buffer
    and all of dh is free until they are copied in."""
    if rows_idx is None:
        return dh, None
    n = rows_idx.shape[0]
    ascending = n < 2 or bool((rows_idx[1:] > rows_idx[:-1]).all())
    return (dh[:n], dh[n:]) if ascending else (dh.new_zeros(n, dh.shape[1]), dh)


_SCATTER_BLOCK = 64  # rows moved at a time by `_scatter_rows`


def _scatter_rows(dh, compact, rows_idx):
    """Row i of `compact` (the counted rows' gradients) to dh's row rows_idx[i], every other row of dh zeroed. In
    place when compact is dh's head: blocks from the last, since rows_idx[i] >= i (ascending, distinct) a block
    only lands on rows already moved, or its own (hence the block's copy)."""
    if compact.data_ptr() != dh.data_ptr():
        dh.zero_().index_copy_(0, rows_idx, compact)
        return
    n, block = compact.shape[0], _SCATTER_BLOCK
    for a in range((n - 1) // block * block, -1, -block):
        b = min(a + block, n)
        dh.index_copy_(0, rows_idx[a:b], compact[a:b].clone())
    other = torch.ones(dh.shape[0], dtype=torch.bool, device=dh.device).index_fill_(0, rows_idx, False)
    dh.index_fill_(0, other.nonzero().squeeze(1), 0.0)


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
    compact, free = (None, None) if dh is None else _compact_dh(dh, rows_idx)
    bufs = _TileBuffers(h, weight, bias, rows=rows, cols=cols, cd=cd, softcap=softcap, logit_scale=logit_scale,
                        gather=rows_idx is not None, space=_Space(free, h.device))
    eps = label_smoothing
    # One pass when only dh is asked for (a frozen head: LoRA SFT): flash-attention style, dh_i = sum_v g_iv W_v is
    # accumulated as acc_i = sum_v exp(z_iv - m_i) f_iv W_v (f = d z / d a), rescaled as the running max m_i grows,
    # and finished with the row's lse: 4 n H V FLOPs instead of 6 (no logits recompute). Label smoothing's
    # -eps/V sum_v f_iv W_v term is a constant (the weight's column sum) only without softcap.
    online = grads and dh is not None and dw is None and db is None and not bufs.single and not (eps and softcap)
    wsum = None
    if online and eps:
        wsum = torch.zeros(H, **f32)
        for v0 in range(0, V, cols):
            wsum += weight[v0:v0 + cols].sum(0, dtype=torch.float32)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        hc, yc = bufs.chunk(h, rows_idx, s, e), y[s:e]
        dhc = compact[s:e] if dh is not None else None  # zeros; online: sum_v exp(z - max) f W as it goes
        zmax, ssum, zy, zsum = _lse_pass(bufs, hc, yc, eps, dhc if online else None)
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
            _finish_online_dh(dhc, weight, yc, zy, ssum, r, coef, eps=eps, softcap=softcap, wsum=wsum)
        else:
            _grad_pass(bufs, hc, yc, lc, ssum, r, coef, eps=eps, dhc=dhc, dw=dw, db=db, first=s == 0)
    if dh is not None and rows_idx is not None:
        _scatter_rows(dh, compact, rows_idx)
    return loss, lse, hit, dh, dw, db
