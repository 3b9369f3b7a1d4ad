"""Triton kernels of LoRA linear (math, memory plan, dropout mask, launchers and cost plan: `sftfuse.kernels.lora`).

The CUDA path runs the big products as library GEMMs (cuBLAS) and only the dropout-bearing rank-r pieces here, each
once per layer (no per-tile recompute of t = dropout(x) A^T or u = dy B, no dropout hash regenerated per N tile):
- `_lora_proj_kernel`: t = z_scale * dropout(x) A^T (M, r), one K sweep over x with the keep mask in registers;
  the forward's only Triton launch (without dropout t is a cuBLAS GEMM).
- `_lora_update_kernel`: dx += scale * mask * (u A), the backward's adapter term where the forward dropped x (a
  rank-r GEMM whose epilogue reads and writes dx once; without dropout it is an `addmm_`).
- `_lora_reduce_kernel`: dA = s/(1-p) u^T dropout(x), split over tokens for parallelism, fp32 partials summed.
Row offsets are int64 (M x K passes 2^31 at ~75k tokens into a 28,672-wide down_proj). An NF4 base goes through
`sftfuse.kernels.nf4` (fused decode GEMM or dequantize + cuBLAS, by its cost plan), never through these kernels.
Limits: r <= 64 (one R tile; the launcher sends larger ranks to the PyTorch path, with a warning). fp32 inputs use
three-pass TF32 dots on GPU (tensor cores at about fp32 accuracy), IEEE dots under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sftfuse.kernels._registry import KernelSpec, interpreter_active, register_kernel


@triton.jit
def _keys(idx, seed, MULT: tl.constexpr, SALT: tl.constexpr):
    """Fully mixed int32 key per row (or column) index: the same bits as `_keys32`."""
    h = idx.to(tl.uint32) * MULT
    h = h ^ (seed.to(tl.uint32) ^ SALT)
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    h = h ^ (h >> 16)
    return (h >> 12).to(tl.int32)  # 20-bit keys, as `_keys32`


@triton.jit
def _keep_tile(row_keys, col_keys, thr):
    """Dropout keep mask of a tile, (len(row_keys), len(col_keys)): `dropout_mask` in registers (int32 wraps)."""
    h = row_keys[:, None] + col_keys[None, :]
    h = h * -1640531535  # 0x9E3779B1 as int32
    h = h ^ (h >> 15)
    h = h * -2048144789  # 0x85EBCA6B as int32
    return h >= thr


@triton.jit
def _lora_proj_kernel(
    # pointers: Z (M, R_REAL) = z_scale * [mask](X) @ D, X (M, K), D (K, R_REAL) (A^T read through its strides)
    x_ptr, d_ptr, z_ptr,
    # sizes
    M, K, R_REAL,
    # strides
    stride_xm, stride_xk, stride_dk, stride_dr, stride_zm,
    # scalars: Z's scale (1/(1-p) under dropout), dropout seed and threshold
    z_scale, seed, thr,
    # flags
    IN_MASK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R)
    rows = offs_m.to(tl.int64)[:, None] * stride_xm  # int64: M x K may pass 2^31
    row_keys = _keys(offs_m, seed, 0x9E3779B1, 0)
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows + offs_k[None, :] * stride_xk, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                    other=0.0)
        d = tl.load(d_ptr + offs_k[:, None] * stride_dk + offs_r[None, :] * stride_dr,
                    mask=(offs_k[:, None] < K) & (offs_r[None, :] < R_REAL), other=0.0)
        if UPCAST:  # the interpreter computes bf16 arithmetic wrongly: fp32 throughout
            x, d = x.to(tl.float32), d.to(tl.float32)
        if IN_MASK:  # the adapter's input dropout, regenerated from the seed, never stored
            keep = _keep_tile(row_keys, _keys(offs_k, seed, 0x27D4EB2F, 0x165667B1), thr)
            x = tl.where(keep, x, tl.zeros_like(x))
        acc = tl.dot(x, d, acc, input_precision=PREC)
    tl.store(z_ptr + offs_m.to(tl.int64)[:, None] * stride_zm + offs_r[None, :], (acc * z_scale).to(
        z_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_r[None, :] < R_REAL))


@triton.jit
def _lora_update_kernel(
    # pointers: Y (M, N) += scale * [mask](Z (M, R_REAL) @ V (R_REAL, N)), Y read and written once
    y_ptr, z_ptr, v_ptr,
    # sizes: NV is V's column bound (N, or N rounded up to 16 where the launcher zero-padded V for aligned loads);
    # each program takes one BLOCK_M row stripe and cols_per_split columns of it
    M, N, NV, R_REAL, cols_per_split,
    # strides
    stride_ym, stride_zm, stride_vr, stride_vn,
    # scalars: scale (s / (1 - p)), dropout seed and threshold
    scale, seed, thr,
    # flags
    OUT_MASK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R)
    rows = offs_m.to(tl.int64)[:, None]
    # the stripe's Z rows once; the loop streams V and Y tiles (V's through cp.async, num_stages deep)
    z = tl.load(z_ptr + rows * stride_zm + offs_r[None, :], mask=(offs_m[:, None] < M) & (offs_r[None, :] < R_REAL),
                other=0.0)
    if UPCAST:
        z = z.to(tl.float32)
    row_keys = _keys(offs_m, seed, 0x9E3779B1, 0)
    n_lo = pid_n * cols_per_split
    n_hi = min(N, n_lo + cols_per_split)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        v = tl.load(v_ptr + offs_r[:, None] * stride_vr + offs_n[None, :] * stride_vn,
                    mask=(offs_r[:, None] < R_REAL) & (offs_n[None, :] < NV), other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        corr = tl.dot(z, v, input_precision=PREC)
        if OUT_MASK:  # dx's adapter term is zero where the forward dropped x
            keep = _keep_tile(row_keys, _keys(offs_n, seed, 0x27D4EB2F, 0x165667B1), thr)
            corr = tl.where(keep, corr, 0.0)
        y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < n_hi)
        y_ptrs = y_ptr + rows * stride_ym + offs_n[None, :]
        y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32) + scale * corr
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _lora_reduce_kernel(
    # pointers: out[split] (R, P) = scale * ([mask](X)^T @ Y)^T over this split's token rows
    x_ptr, y_ptr, out_ptr,
    # sizes
    M, P, R_REAL, rows_per_split,
    # strides
    stride_xm, stride_xp, stride_ym, stride_os,
    # scalars
    scale, seed, thr,
    # flags
    IN_MASK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, R: tl.constexpr,
):
    pid_p, pid_s = tl.program_id(0), tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.arange(0, R)
    col_keys = _keys(offs_p, seed, 0x27D4EB2F, 0x165667B1)
    m_lo = pid_s * rows_per_split
    m_hi = min(M, m_lo + rows_per_split)
    acc = tl.zeros((BLOCK_P, R), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows * stride_xm + offs_p[None, :] * stride_xp,
                    mask=(offs_m[:, None] < m_hi) & (offs_p[None, :] < P), other=0.0)
        y = tl.load(y_ptr + rows * stride_ym + offs_r[None, :],
                    mask=(offs_m[:, None] < m_hi) & (offs_r[None, :] < R_REAL), other=0.0)
        if UPCAST:
            x, y = x.to(tl.float32), y.to(tl.float32)
        if IN_MASK:
            keep = _keep_tile(_keys(offs_m, seed, 0x9E3779B1, 0), col_keys, thr)
            x = tl.where(keep, x, tl.zeros_like(x))
        acc = tl.dot(tl.trans(x), y, acc, input_precision=PREC)
    # stored transposed, out[split] (R, P): the partials' sum is dA itself, (r, K), with no transposing copy
    tl.store(out_ptr + pid_s.to(tl.int64) * stride_os + offs_r[None, :] * P + offs_p[:, None], acc * scale,
             mask=(offs_p[:, None] < P) & (offs_r[None, :] < R_REAL))


# ---------------------------------------------------------------------------------------------------------------
# Block sizes and flags (the launchers are in sftfuse/kernels/lora.py, which also keeps ranks over 64 off these
# kernels: they hold the rank in one R tile)


def _rank_tile(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _interp(**blocks) -> dict:
    return {**blocks, "num_warps": 4, "num_stages": 1}


def proj_config(dtype: torch.dtype, R: int, divisible: bool) -> dict:
    """t = dropout(x) A^T: bound by reading x once (M x K x 2 bytes); a 64-row tile keeps >= 128 programs at 8k
    tokens. `divisible`: K (x's row stride) is a multiple of 16, so rows load as vectors through cp.async; without
    it each element takes its own 64-bit address, and a shallower tile keeps registers under 232 on sm_80. Tiles
    keep 64 rows, the least a Hopper warpgroup MMA takes."""
    if interpreter_active():
        return _interp(BLOCK_M=32, BLOCK_K=32)
    if dtype == torch.float32:  # three TF32 passes hold split operands: a 16-deep K tile, 8 warps past r = 16
        return {"BLOCK_M": 64, "BLOCK_K": 16, "num_warps": 8 if R > 16 else 4, "num_stages": 4}
    if not divisible:
        return {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 8 if R > 32 else 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}


def update_config(dtype: torch.dtype, R: int, divisible: bool) -> dict:
    """dx += scale mask (u A): bound by dx's read and write. A program keeps its row stripe's u in registers and
    streams A's column tiles through cp.async (`num_stages` deep) with dx's. The launcher zero-pads A's rows to a
    multiple of 16 (a few KB), so they always load as vectors. `divisible`: N (dx's row stride) is a multiple of 16;
    otherwise dx's elements load one by one."""
    if interpreter_active():
        return _interp(BLOCK_M=32, BLOCK_N=32)
    if not divisible:  # dx's elements each take a 64-bit address: 8 warps share them (sm_80's 232 registers)
        wide = dtype == torch.float32
        return {"BLOCK_M": 64, "BLOCK_N": 32 if wide else 64, "num_warps": 8, "num_stages": 2 if wide and R > 32 else 3}
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8 if R > 32 else 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}


def reduce_config(dtype: torch.dtype, R: int, divisible: bool) -> dict:
    """dA^T = s/(1-p) dropout(x)^T u over token splits. `divisible`: P (x's row stride) is a multiple of 16."""
    if interpreter_active():
        return _interp(BLOCK_M=32, BLOCK_P=32)
    if dtype == torch.float32 or not divisible:
        return {"BLOCK_M": 16 if R > 32 else 32, "BLOCK_P": 64, "num_warps": 8 if R > 32 else 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_P": 64, "num_warps": 4, "num_stages": 3}


def _flags(dtype):
    """UPCAST: fp32 arithmetic under the interpreter (its bf16 is wrong). PREC: fp32 inputs use three TF32 passes
    (tensor cores at about fp32 accuracy; plain IEEE dots would run on the CUDA cores), IEEE under the interpreter."""
    interp = interpreter_active()
    return {"UPCAST": interp, "PREC": "tf32" if dtype != torch.float32 else ("ieee" if interp else "tf32x3")}


# ---------------------------------------------------------------------------------------------------------------
# Compile check: every configuration the launchers (in sftfuse/kernels/lora_launch.py) pick on a GPU, with the
# divisibility they guarantee: contiguous operands (unit inner strides), split lengths that are multiples of the
# block, and K and N of real models multiples of 16. Odd widths: fp32 rows load through 4-byte cp.async as they are
# (the `_odd` variants); a 16-bit x is zero-padded by the launcher to a width of a multiple of 16 (proj and reduce:
# their odd variant is the divisible one), and so is update's V in every dtype (its odd variant has dx unaligned)

_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_PREC = {torch.bfloat16: "tf32", torch.float16: "tf32", torch.float32: "tf32x3"}


def _spec(name, fn, config, dtype, R, divisible, sig, unit, flags, sizes, always=()):
    """One configuration as the launcher picks it: blocks from `config(dtype, R, divisible)`, unit inner strides
    (contiguous operands), `always` divisible by 16, and with `divisible` also `sizes` (as Triton specializes such
    integers at launch; the pointers are always 16-byte aligned fresh or contiguous tensors)."""
    cfg = config(dtype, R, divisible)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    const = {u: 1 for u in unit} | flags | {"UPCAST": False, "PREC": _PREC[dtype], "R": R, **cfg}
    sig = {k: v for k, v in sig.items() if k not in unit} | {n: "constexpr" for n in const}
    ptrs = tuple(k for k, v in sig.items() if v.startswith("*"))
    return KernelSpec(f"{name}_{_TY[dtype]}_r{R}{'' if divisible else '_odd'}", fn, sig, const, num_warps=warps,
                      num_stages=stages, divisible=ptrs + tuple(always) + (sizes if divisible else ()))


def _i32(*names):
    return {n: "i32" for n in names}


def _specs():
    specs = []
    for dtype, R, div in [(d, r, v) for d in (torch.bfloat16, torch.float32) for r in (16, 32, 64) for v in (1, 0)]:
        ty, wide = f"*{_TY[dtype]}", dtype == torch.float32
        proj = {"x_ptr": ty, "d_ptr": ty, "z_ptr": ty, **_i32("M", "K", "R_REAL", "stride_xm", "stride_xk",
                                                              "stride_dk", "stride_dr", "stride_zm"),
                "z_scale": "fp32", **_i32("seed", "thr")}
        red = {"x_ptr": ty, "y_ptr": ty, "out_ptr": "*fp32", **_i32("M", "P", "R_REAL", "rows_per_split",
                                                                    "stride_xm", "stride_xp", "stride_ym",
                                                                    "stride_os"),
               "scale": "fp32", **_i32("seed", "thr")}
        if div or wide:  # a 16-bit odd width is padded: the launcher runs the divisible build
            specs.append(_spec("lora_proj", _lora_proj_kernel, proj_config, dtype, R, div, proj,
                               ("stride_xk", "stride_dr"), {"IN_MASK": True}, ("K", "stride_xm", "stride_dk")))
            specs.append(_spec("lora_reduce", _lora_reduce_kernel, reduce_config, dtype, R, div, red,
                               ("stride_xp",), {"IN_MASK": True}, ("P", "stride_xm", "stride_os"),
                               always=("rows_per_split",)))
        upd = {"y_ptr": ty, "z_ptr": ty, "v_ptr": ty, **_i32("M", "N", "NV", "R_REAL", "cols_per_split",
                                                             "stride_ym", "stride_zm", "stride_vr", "stride_vn"),
               "scale": "fp32", **_i32("seed", "thr")}
        specs.append(_spec("lora_update", _lora_update_kernel, update_config, dtype, R, div, upd, ("stride_vn",),
                           {"OUT_MASK": True}, ("N", "stride_ym", "NV", "stride_vr"),
                           always=("cols_per_split", "NV", "stride_vr")))  # V is padded
    return specs


register_kernel("lora", _specs)
