"""Triton kernels of RMSNorm (math, rules, PyTorch path and launchers: sftfuse/kernels/rms_norm.py).

- `_rms_norm_fwd_kernel`: ROWS rows per program, each whole row in registers: r = rsqrt(mean(x^2) + eps), y by the
  rule, r stored (one fp32 per row, saved for the backward). One read of x, one write of y: 4 bytes per element in
  bf16, against about ten elementwise passes for the eager module.
- `_rms_norm_bwd_kernel`: a persistent grid; each program sweeps a run of rows, writes dx = r (g - x_hat mean(g x_hat))
  and accumulates its share of dw in registers, stored once as an fp32 partial row (summed by the launcher).
Arithmetic is fp32; the intermediate casts of Hugging Face's modules (x_hat to x's dtype, dy w in the output dtype)
are kept, rounded to nearest even (`cast_rne`, exact under the interpreter too). Row offsets are int64.
Limits: H <= MAX_H (one row in registers); the launcher sends wider rows to the PyTorch path.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sftfuse.kernels._common_triton import cast_rne
from sftfuse.kernels._registry import KernelSpec, interpreter_active, register_kernel

MAX_H = 8192  # one row in registers: the backward at 16384 spilled (128 registers per thread at 16 warps)


@triton.jit
def _rms_norm_fwd_kernel(
    # pointers
    x_ptr, w_ptr, y_ptr, r_ptr,
    # sizes
    M, H,
    # strides (inner strides are 1)
    stride_xm, stride_ym,
    # scalars
    eps,
    # flags
    ONE_PLUS: tl.constexpr, INTERP: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < M) & (cols[None, :] < H)
    rows64 = rows.to(tl.int64)[:, None]  # int64: M x H may pass 2^31
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    r = tl.rsqrt(tl.sum(x * x, axis=1) / H + eps)
    x_hat = x * r[:, None]
    if ONE_PLUS:  # Gemma-2: dtype(x_hat * (1 + w))
        y = x_hat * (1.0 + w)
    else:  # Llama: w * dtype(x_hat), in the promoted output dtype
        y = w * cast_rne(x_hat, x_ptr.dtype.element_ty, INTERP).to(tl.float32)
    tl.store(y_ptr + rows64 * stride_ym + cols[None, :], cast_rne(y, y_ptr.dtype.element_ty, INTERP), mask=mask)
    tl.store(r_ptr + rows, r, mask=rows < M)


@triton.jit
def _rms_norm_bwd_kernel(
    # pointers: dx (M, H); dw partials (programs, H) in fp32
    dy_ptr, x_ptr, w_ptr, r_ptr, dx_ptr, dw_ptr,
    # sizes
    M, H, rows_per_prog,
    # strides (inner strides are 1)
    stride_dym, stride_xm, stride_dxm,
    # flags
    ONE_PLUS: tl.constexpr, NEED_DW: tl.constexpr, INTERP: tl.constexpr, BLOCK_H: tl.constexpr,
    ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
    m_lo = pid * rows_per_prog
    m_hi = min(M, m_lo + rows_per_prog)
    for m0 in range(m_lo, m_hi, ROWS):
        rows = m0 + tl.arange(0, ROWS)
        mask = (rows[:, None] < m_hi) & (cols[None, :] < H)
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64 * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + rows, mask=rows < m_hi, other=0.0)[:, None]
        x_hat = x * r
        if ONE_PLUS:
            g = dy * (1.0 + w)
            dw_rows = dy * x_hat
        else:  # autograd's dy * w in the output dtype, and dw against dtype(x_hat), as the module
            g = cast_rne(dy * w, dy_ptr.dtype.element_ty, INTERP).to(tl.float32)
            dw_rows = dy * cast_rne(x_hat, x_ptr.dtype.element_ty, INTERP).to(tl.float32)
        dot = tl.sum(g * x_hat, axis=1)[:, None] / H
        dx = (g - x_hat * dot) * r
        tl.store(dx_ptr + rows64 * stride_dxm + cols[None, :], cast_rne(dx, dx_ptr.dtype.element_ty, INTERP),
                 mask=mask)
        if NEED_DW:
            dw += tl.sum(tl.where(mask, dw_rows, 0.0), axis=0)
    if NEED_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * H + cols, dw, mask=cols < H)


# ---------------------------------------------------------------------------------------------------------------
# Block sizes (launchers: sftfuse/kernels/rms_norm.py)


def config(H: int) -> dict:
    """BLOCK_H (the row, padded to a power of two), ROWS per step and warps: about 8-16 fp32 values per thread."""
    block_h = triton.next_power_of_2(H)
    if interpreter_active():
        return {"BLOCK_H": block_h, "ROWS": 4, "num_warps": 1}
    warps = min(16, max(1, block_h // 512))
    rows = max(1, min(16, 2048 // block_h))
    return {"BLOCK_H": block_h, "ROWS": rows, "num_warps": warps}


def bwd_programs(M: int, rows: int, sms: int) -> int:
    """Programs of the backward: a few per SM (each keeps one dw partial row), never more than row steps."""
    return max(1, min(triton.cdiv(M, rows), 2 if interpreter_active() else 4 * sms))


# ---------------------------------------------------------------------------------------------------------------
# Compile check: the widths of the families' hidden sizes (576 -> 1024, 2048, 4096, 8192) and the limit, in bf16,
# with the divisibility the launcher's contiguous rows give when H is a multiple of 16

_H = (576, 2048, 4096, MAX_H)


def _specs() -> list[KernelSpec]:
    specs = []
    for H in _H:
        cfg = config(H)
        warps = cfg.pop("num_warps")
        for one_plus in (False, True):
            fwd = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "r_ptr": "*fp32", "M": "i32", "H": "i32",
                   "stride_xm": "i32", "stride_ym": "i32", "eps": "fp32"}
            const = {"ONE_PLUS": one_plus, "INTERP": False, **cfg}
            specs.append(KernelSpec("rms_norm_fwd", _rms_norm_fwd_kernel, fwd | {k: "constexpr" for k in const},
                                    const, num_warps=warps, num_stages=1,
                                    divisible=("x_ptr", "w_ptr", "y_ptr", "r_ptr", "H", "stride_xm", "stride_ym")))
            bwd = {"dy_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*bf16", "r_ptr": "*fp32", "dx_ptr": "*bf16",
                   "dw_ptr": "*fp32", "M": "i32", "H": "i32", "rows_per_prog": "i32", "stride_dym": "i32",
                   "stride_xm": "i32", "stride_dxm": "i32"}
            const = {"ONE_PLUS": one_plus, "NEED_DW": True, "INTERP": False, **cfg}
            specs.append(KernelSpec("rms_norm_bwd", _rms_norm_bwd_kernel, bwd | {k: "constexpr" for k in const},
                                    const, num_warps=warps, num_stages=1,
                                    divisible=("dy_ptr", "x_ptr", "w_ptr", "r_ptr", "dx_ptr", "dw_ptr", "H",
                                               "stride_dym", "stride_xm", "stride_dxm")))
    return specs


register_kernel("rms_norm", _specs)
