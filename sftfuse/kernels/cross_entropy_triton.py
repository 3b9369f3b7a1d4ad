"""Triton kernels of linear + cross-entropy (math, PyTorch path: cross_entropy.py; launchers: cross_entropy_launch.py).

- `_lce_fwd_kernel`: per BLOCK_M counted rows, the loss, lse and hit, with an online log-sum-exp over vocabulary
  tiles of logits formed in registers (`_logits_tile`); nothing of size tokens x V is written.
- `_lce_bwd_kernel`: one (BLOCK_M, BLOCK_N) logits tile recomputed per program, turned into its logit gradient
  and emitted as fp32 atomic adds to dh (over vocabulary tiles) and dW (over row tiles), and db.
Offsets are int64 (tokens x V and V x H exceed 2^31 for real heads). `_triton_config` picks the block sizes.
"""

from __future__ import annotations

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
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
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
    if COMPUTE_DB:  # not has_bias: a frozen bias is added to the logits but gets no gradient
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


# ---------------------------------------------------------------------------------------------------------------
# Compile check: every configuration the launchers (in cross_entropy_launch.py) pick on a GPU

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
               "db_ptr": "*fp32", "filter_eps": "fp32",
               **{m: "constexpr" for m in (*meta, "COMPUTE_DW", "COMPUTE_DB")}}
        sig = {a: sig[a] for a in _lce_bwd_kernel.arg_names}
        for dw, db in ((True, True), (True, False), (False, False)):  # a trained bias comes with a trained weight
            specs.append(KernelSpec(f"lce_bwd_{p[1:]}", _lce_bwd_kernel, sig,
                                    {**{m: cfg[m] for m in meta}, "COMPUTE_DW": dw, "COMPUTE_DB": db}, cfg["num_warps"],
                                    cfg["num_stages"], ("h_ptr", "w_ptr", "dh_ptr", "dw_ptr", "stride_hm",
                                                        "stride_wv", "H")))
    return specs


register_kernel("cross_entropy", _specs)
