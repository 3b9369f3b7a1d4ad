"""Triton kernels of linear + cross-entropy and their launch plan (math, PyTorch path: cross_entropy.py; launchers:
cross_entropy_launch.py).

- `_lce_stats_kernel`: one (BLOCK_M rows x vocabulary slice) program: logits tiles formed in registers
  (`_logits_tile`), an online log-sum-exp over the slice's tiles, and the slice's partial statistics (running max,
  rescaled sum, the label's logit, the logit sum) written to a (4, splits, n) buffer, merged afterwards (a
  log-sum-exp over slices). With STORE_Z the fp32 logits tiles are also written into a chunk buffer. Program ids
  run the row blocks fastest, so every row block of a slice reads a weight tile while it is in L2.
- `_lce_grad_kernel`: one row per program, walking the row's vocabulary tiles in order, turns the chunk's logits
  into their gradient in place (in the input dtype, written over the first half of each fp32 row).
- `_lce_dw_kernel`: dW (V, H) fp32 [+]= g^T h over a chunk: a GEMM that owns its output tile (no atomics),
  grouped launch order; the first chunk stores, the others add once.
dh = g W is a library GEMM (cuBLAS). Offsets are int64 (tokens x V and V x H exceed 2^31 for real heads).

`lce_plan` is the one place the launch is decided (chunk rows, vocabulary slices, every kernel's tiles and grid):
the launchers, the compile check and the cost model (`sftfuse.kernels.roofline`) all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sftfuse.kernels._registry import KernelSpec, interpreter_active, register_kernel


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


# Row and slice counts change from call to call (a last partial chunk, the slices a row count needs): left
# unspecialized, so one compiled variant serves them all and the compile check builds that one.
@triton.jit(do_not_specialize=["n_rows", "tiles_per_split", "splits"])
def _lce_stats_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, y_ptr, z_ptr, stat_ptr,
    # sizes and strides (inner strides are 1; z is (n_rows, V) fp32 with row stride stride_zm)
    n_rows, V, H, stride_hm, stride_wv, stride_zm, tiles_per_split, splits,
    # flags and options
    has_bias, softcap, logit_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, FP32: tl.constexpr,
    STORE_Z: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(n_rows, BLOCK_M)
    pid_m, pid_s = pid % num_m, pid // num_m  # row blocks fastest: a slice's weight tiles are read once into L2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_rows
    y = tl.load(y_ptr + offs_m, mask=row_ok, other=0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    z_y = tl.zeros((BLOCK_M,), tl.float32)
    z_sum = tl.zeros((BLOCK_M,), tl.float32)
    v_first = pid_s * tiles_per_split * BLOCK_N  # < V: every slice starts inside the vocabulary (lce_plan)
    for t in range(0, tiles_per_split):
        offs_n = v_first + t * BLOCK_N + tl.arange(0, BLOCK_N)
        z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_m, offs_n, n_rows, V, H, stride_hm, stride_wv, has_bias,
                         logit_scale, softcap, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, FP32)
        col_ok = (offs_n < V)[None, :]
        if STORE_Z:
            tl.store(z_ptr + offs_m.to(tl.int64)[:, None] * stride_zm + offs_n[None, :], z,
                     mask=row_ok[:, None] & col_ok)
        z_sum += tl.sum(tl.where(col_ok, z, 0.0), 1)
        z_y += tl.sum(tl.where(offs_n[None, :] == y[:, None], z, 0.0), 1)
        z = tl.where(col_ok, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))  # finite after the slice's first tile, which is inside V
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m_i = m_new
    out = stat_ptr + pid_s * n_rows + offs_m  # (4, splits, n_rows): max, sum exp(z - max), z_y, sum z
    plane = splits * n_rows
    tl.store(out, m_i, mask=row_ok)
    tl.store(out + plane, l_i, mask=row_ok)
    tl.store(out + 2 * plane, z_y, mask=row_ok)
    tl.store(out + 3 * plane, z_sum, mask=row_ok)


@triton.jit(do_not_specialize=["n_rows"])
def _lce_grad_kernel(
    # pointers: z (n_rows, V) fp32 logits; g the gradient, may alias z (same row starts, stride_gm in its dtype)
    z_ptr, g_ptr, y_ptr, lse_ptr, rw_ptr,
    # sizes and strides
    n_rows, V, stride_zm, stride_gm,
    # options
    label_smoothing, z_loss, softcap, logit_scale,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(y_ptr + row)
    lse = tl.load(lse_ptr + row)
    r = tl.load(rw_ptr + row) * logit_scale
    coef = r * (1.0 + 2.0 * z_loss * lse)
    z_row, g_row = z_ptr + row * stride_zm, g_ptr + row * stride_gm
    # Tiles in increasing order within one program: a 16-bit g written over the row's first half only ever
    # overwrites logits this program has already loaded.
    for v0 in range(0, V, BLOCK_N):
        offs = v0 + tl.arange(0, BLOCK_N)
        ok = offs < V
        z = tl.load(z_row + offs, mask=ok, other=0.0)
        g = tl.exp(z - lse) * coef - r * (label_smoothing / V)
        g -= tl.where(offs == y, r * (1.0 - label_smoothing), 0.0)
        if softcap > 0:
            t = z / softcap
            g = g * (1.0 - t * t)
        tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["n_rows"])
def _lce_dw_kernel(
    # pointers: g (n_rows, V) the chunk's logit gradient, h (n_rows, H) its rows, dw (V, H) fp32
    g_ptr, h_ptr, dw_ptr,
    # sizes and strides (inner strides are 1; dw contiguous)
    n_rows, V, H, stride_gm, stride_hm,
    # meta
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_V: tl.constexpr,
    UPCAST: tl.constexpr, FP32: tl.constexpr, FIRST: tl.constexpr,
):
    pid = tl.program_id(0)
    num_v, num_h = tl.cdiv(V, BLOCK_V), tl.cdiv(H, BLOCK_H)
    group = pid // (GROUP_V * num_h)  # GROUP_V vocabulary blocks x every H block: g and h tiles reused from L2
    first_v = group * GROUP_V
    size_v = tl.minimum(num_v - first_v, GROUP_V)
    pid_v = first_v + (pid % (GROUP_V * num_h)) % size_v
    pid_h = (pid % (GROUP_V * num_h)) // size_v
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        rr = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        r_ok = (rr < n_rows)[:, None]
        g = tl.load(g_ptr + rr[:, None] * stride_gm + offs_v[None, :], mask=r_ok & (offs_v < V)[None, :], other=0.0)
        a = tl.load(h_ptr + rr[:, None] * stride_hm + offs_h[None, :], mask=r_ok & (offs_h < H)[None, :], other=0.0)
        if UPCAST:
            g, a = g.to(tl.float32), a.to(tl.float32)
        if FP32:
            acc = tl.dot(tl.trans(g), a, acc, input_precision="tf32x3")
        else:
            acc = tl.dot(tl.trans(g), a, acc)
    out = dw_ptr + offs_v.to(tl.int64)[:, None] * H + offs_h[None, :]
    ok = (offs_v < V)[:, None] & (offs_h < H)[None, :]
    if not FIRST:  # one read-modify-write per chunk, by the tile's one owner
        acc += tl.load(out, mask=ok, other=0.0)
    tl.store(out, acc, mask=ok)


# ---------------------------------------------------------------------------------------------------------------
# The launch plan: chunk rows, vocabulary slices, tiles and grids (launchers, compile check and cost model read it)

ROWS_TRAINED = 1024  # chunk rows when dW is formed: its fp32 read-modify-write per chunk stays under its GEMM time
ROWS_FROZEN = 512  # chunk rows for dh only: the logits GEMM is compute-bound from about 300 rows on an H100
LOGITS_BUDGET = 1 << 30  # at most 1 GiB of fp32 chunk logits (the chunk shrinks for huge vocabularies)
GRAD_BLOCK = 1024  # vocabulary tile of the elementwise gradient kernel
SMS = 132  # H100 SXM; the launcher passes the device's count


@dataclass(frozen=True)
class LCEPlan:
    """How one linear + cross-entropy call is launched (n counted rows, V, H).

    rows: rows per chunk (the chunk's fp32 logits, rows x V, are the only buffer of size tokens x V); chunks: how
    many. splits, tiles_per_split: vocabulary slices of the stats kernel and BLOCK_N tiles in each. stats, grad,
    dw: each kernel's meta-parameters and num_warps / num_stages; *_grid: its grid for a full chunk.
    """

    n: int
    V: int
    H: int
    rows: int
    chunks: int
    splits: int
    tiles_per_split: int
    stats: dict
    stats_grid: tuple
    grad: dict
    grad_grid: tuple
    dw: dict | None
    dw_grid: tuple | None


def _tiles(dtype: torch.dtype, interpret: bool) -> tuple[dict, dict]:
    """(stats kernel config, dW kernel config). The interpreter gets small fp32 tiles (several K steps at H=64)."""
    if interpret:
        return ({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 32, "UPCAST": True, "FP32": False, "num_warps": 4,
                 "num_stages": 1},
                {"BLOCK_V": 64, "BLOCK_H": 32, "BLOCK_R": 16, "GROUP_V": 4, "UPCAST": True, "FP32": False,
                 "num_warps": 4, "num_stages": 1})
    # Picked with the compile check: no spills on sm_80/sm_90, wgmma / mma.sync (tf32x3 for fp32), cp.async.
    if dtype == torch.float32:
        return ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "UPCAST": False, "FP32": True, "num_warps": 8,
                 "num_stages": 3},
                {"BLOCK_V": 64, "BLOCK_H": 64, "BLOCK_R": 32, "GROUP_V": 8, "UPCAST": False, "FP32": True,
                 "num_warps": 4, "num_stages": 3})
    # 128 x 128 stats tiles need 255 registers on sm_80 (spilling: the epilogue's masks and pointers beside the
    # accumulator); 64 x 128 over 8 warps takes 184 (sm_80) / 174 (sm_90), none spilled.
    return ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "UPCAST": False, "FP32": False, "num_warps": 8,
             "num_stages": 3},
            {"BLOCK_V": 128, "BLOCK_H": 128, "BLOCK_R": 64, "GROUP_V": 8, "UPCAST": False, "FP32": False,
             "num_warps": 8, "num_stages": 3})


def lce_plan(n: int, V: int, H: int, dtype: torch.dtype, *, grads: bool, need_dw: bool = False,
             sms: int = SMS, interpret: bool | None = None) -> LCEPlan:
    """The launch of one call: n counted rows, head (V, H) in `dtype`; grads: the gradients are formed (else the
    loss only, one chunk of all n rows, no logits buffer); need_dw: the weight gradient too; sms: the device's SMs.
    """
    interpret = interpreter_active() if interpret is None else interpret
    stats, dw = _tiles(dtype, interpret)
    bm, bn = stats["BLOCK_M"], stats["BLOCK_N"]
    if grads:
        want = ROWS_TRAINED if need_dw else ROWS_FROZEN
        fit = max(bm, LOGITS_BUDGET // (4 * V) // bm * bm)
        rows = max(1, min(n, want, fit))
    else:
        rows = max(1, n)
    num_m = triton.cdiv(rows, bm)
    num_tiles = triton.cdiv(V, bn)
    splits = max(1, min(num_tiles, triton.cdiv(2 * sms, num_m)))  # about two programs per SM
    tiles_per_split = triton.cdiv(num_tiles, splits)
    splits = triton.cdiv(num_tiles, tiles_per_split)  # so that every slice starts inside V
    dw_cfg = dw if grads and need_dw else None
    dw_grid = None
    if dw_cfg is not None:
        dw_grid = (triton.cdiv(V, dw["BLOCK_V"]) * triton.cdiv(H, dw["BLOCK_H"]),)
    grad = {"BLOCK_N": GRAD_BLOCK, "num_warps": 4, "num_stages": 1}
    return LCEPlan(n, V, H, rows, triton.cdiv(n, rows) if n else 0, splits, tiles_per_split, stats,
                   (num_m * splits,), grad, (rows,), dw_cfg, dw_grid)


# ---------------------------------------------------------------------------------------------------------------
# Compile check: exactly the variants the launchers run on a GPU. Triton's JIT specializes every integer and
# pointer argument on divisibility by 16; at real heads (H, V, strides multiples of 16, fresh allocations, chunk
# offsets that are multiples of the chunk) these are the ones that run, so they are declared so here
# (tests/kernels/test_roofline.py compares them with a launch's arguments). The row and slice counts are not
# specialized (`do_not_specialize`), so they are declared nothing.

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
_META_STATS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "UPCAST", "FP32")


def _specs() -> list[KernelSpec]:
    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        p = _PTR[dtype]
        pl = lce_plan(8192, 128256, 4096, dtype, grads=True, need_dw=True, interpret=False)
        cfg = pl.stats
        sig = {"h_ptr": p, "w_ptr": p, "b_ptr": p, "y_ptr": "*i64", "z_ptr": "*fp32", "stat_ptr": "*fp32",
               "n_rows": "i32", "V": "i32", "H": "i32", "stride_hm": "i32", "stride_wv": "i32", "stride_zm": "i32",
               "tiles_per_split": "i32", "splits": "i32", "has_bias": "i1", "softcap": "fp32",
               "logit_scale": "fp32", **{m: "constexpr" for m in (*_META_STATS, "STORE_Z")}}
        div = ("h_ptr", "w_ptr", "b_ptr", "y_ptr", "z_ptr", "stat_ptr", "V", "H", "stride_hm", "stride_wv",
               "stride_zm")
        for store in (False, True):  # loss only / the chunk's logits kept for the gradient
            specs.append(KernelSpec(f"lce_stats_{p[1:]}", _lce_stats_kernel, {a: sig[a] for a in
                                    _lce_stats_kernel.arg_names}, {**{m: cfg[m] for m in _META_STATS},
                                                                    "STORE_Z": store},
                                    cfg["num_warps"], cfg["num_stages"], div))
        sig = {"z_ptr": "*fp32", "g_ptr": p, "y_ptr": "*i64", "lse_ptr": "*fp32", "rw_ptr": "*fp32", "n_rows": "i32",
               "V": "i32", "stride_zm": "i32", "stride_gm": "i32", "label_smoothing": "fp32", "z_loss": "fp32",
               "softcap": "fp32", "logit_scale": "fp32", "BLOCK_N": "constexpr"}
        specs.append(KernelSpec(f"lce_grad_{p[1:]}", _lce_grad_kernel, sig, {"BLOCK_N": pl.grad["BLOCK_N"]},
                                pl.grad["num_warps"], pl.grad["num_stages"],
                                ("z_ptr", "g_ptr", "y_ptr", "lse_ptr", "rw_ptr", "V", "stride_zm", "stride_gm")))
        meta = ("BLOCK_V", "BLOCK_H", "BLOCK_R", "GROUP_V", "UPCAST", "FP32")
        sig = {"g_ptr": p, "h_ptr": p, "dw_ptr": "*fp32", "n_rows": "i32", "V": "i32", "H": "i32", "stride_gm": "i32",
               "stride_hm": "i32", **{m: "constexpr" for m in (*meta, "FIRST")}}
        for first in (True, False):
            specs.append(KernelSpec(f"lce_dw_{p[1:]}", _lce_dw_kernel, sig,
                                    {**{m: pl.dw[m] for m in meta}, "FIRST": first}, pl.dw["num_warps"],
                                    pl.dw["num_stages"], ("g_ptr", "h_ptr", "dw_ptr", "V", "H", "stride_gm",
                                                          "stride_hm")))
    return specs


register_kernel("cross_entropy", _specs)
