"""Triton kernels of LoRA linear (math, memory plan, dropout mask and launchers: `sftfuse.kernels.lora`).

`_lora_mm_kernel` is one matmul with the adapter folded in. Forward: y = x W^T + b + s t B^T, where the same K
loop that reads x for x W^T also forms t = dropout(x) A^T (an extra R-wide dot, the mask regenerated in registers)
and the programs of the first column block store t. Backward (dx): dx = dy W + s mask (u A) / (1 - p), the K loop
over dy forming u = dy B alongside. An NF4 base (IS_NF4) is decoded in registers inside the K loop (nibble ->
code -> block scale, double-quantized scales included; bitsandbytes' layout as in `sftfuse.kernels.nf4`) up to
nf4's FUSED_MAX_TOKENS tokens; above, the GEMM is compute-bound and the weight is dequantized once instead.
`_lora_reduce_kernel` forms dA^T = s/(1-p) dropout(x)^T u and dB = s dy^T t, split over tokens for parallelism,
fp32 partials summed after.
Limits: r <= 64 (one R tile; the launcher sends larger ranks to the PyTorch path, with a warning). fp32 inputs use
IEEE fp32 dots (no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sftfuse.kernels._registry import KernelSpec, interpreter_active, register_kernel
from sftfuse.kernels.nf4_triton import _codes, _scales


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
def _nf4_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset, flat, mask,
              DOUBLE_QUANT: tl.constexpr, NF4_BLOCK: tl.constexpr):
    """fp32 values of the NF4 weight at flat indices `flat`: nf4_triton's own nibble and scale decode."""
    code = _codes(packed_ptr, code_ptr, flat, mask)
    scale = _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, flat // NF4_BLOCK, mask, DOUBLE_QUANT)
    return code * scale


@triton.jit
def _lora_mm_kernel(
    # pointers: X (M, K) @ W (K, N) + s * [mask](Z @ V), Z = [mask](X) @ D (M, R) also stored to z_ptr
    x_ptr, w_ptr, d_ptr, v_ptr, bias_ptr, y_ptr, z_ptr,
    # NF4 base (IS_NF4): packed nibbles, block absmax (uint8 with double quant), nested scales, codes, offset
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, nf4_offset,
    # sizes
    M, N, K, R_REAL,
    # strides
    stride_xm, stride_xk, stride_wk, stride_wn, stride_dk, stride_dr, stride_vr, stride_vn, stride_ym, stride_yn,
    stride_zm,
    # scalars: s (times 1/(1-p) when OUT_MASK), Z's scale (1/(1-p) when IN_MASK), dropout seed and threshold
    scaling, z_scale, seed, thr,
    # flags
    IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NF4_BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr, IN_MASK: tl.constexpr, OUT_MASK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row blocks share each W column block while it sits in L2.
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    row_keys = _keys(offs_m, seed, 0x9E3779B1, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    zacc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        d = tl.load(d_ptr + offs_k[:, None] * stride_dk + offs_r[None, :] * stride_dr,
                    mask=(offs_k[:, None] < K) & (offs_r[None, :] < R_REAL), other=0.0)
        if UPCAST:  # the interpreter computes bf16 arithmetic wrongly: fp32 throughout
            x, d = x.to(tl.float32), d.to(tl.float32)
        w_mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        if IS_NF4:  # W's flat index is k * stride_wk + n * stride_wn in either layout: decode in registers
            w = _nf4_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, nf4_offset,
                          offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn, w_mask, DOUBLE_QUANT, NF4_BLOCK)
            w = w.to(x.dtype)
        else:
            w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn, mask=w_mask, other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PREC)
        if IN_MASK:  # forward dropout on the adapter's input, regenerated from the seed, never stored
            keep = _keep_tile(row_keys, _keys(offs_k, seed, 0x27D4EB2F, 0x165667B1), thr)
            x = tl.where(keep, x, tl.zeros_like(x))
        zacc = tl.dot(x, d, zacc, input_precision=PREC)
    z = zacc * z_scale
    if pid_n == 0:  # t (forward) or u = dy B (backward), saved for dA / dB
        tl.store(z_ptr + offs_m[:, None] * stride_zm + offs_r[None, :], z.to(z_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_r[None, :] < R_REAL))
    if not UPCAST:  # tensor cores in the input dtype, like the stored t the backward will read
        z = z.to(x_ptr.dtype.element_ty)
    v = tl.load(v_ptr + offs_r[:, None] * stride_vr + offs_n[None, :] * stride_vn,
                mask=(offs_r[:, None] < R_REAL) & (offs_n[None, :] < N), other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    corr = tl.dot(z, v, input_precision=PREC)
    if OUT_MASK:  # dx's adapter term is masked where the forward dropped x
        keep = _keep_tile(row_keys, _keys(offs_n, seed, 0x27D4EB2F, 0x165667B1), thr)
        corr = tl.where(keep, corr, 0.0)
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    acc += scaling * corr
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _lora_reduce_kernel(
    # pointers: out[split] (P, R) = scale * [mask](X)^T @ Y over this split's token rows
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
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_p[None, :] * stride_xp,
                    mask=(offs_m[:, None] < m_hi) & (offs_p[None, :] < P), other=0.0)
        y = tl.load(y_ptr + offs_m[:, None] * stride_ym + offs_r[None, :],
                    mask=(offs_m[:, None] < m_hi) & (offs_r[None, :] < R_REAL), other=0.0)
        if UPCAST:
            x, y = x.to(tl.float32), y.to(tl.float32)
        if IN_MASK:
            keep = _keep_tile(_keys(offs_m, seed, 0x9E3779B1, 0), col_keys, thr)
            x = tl.where(keep, x, tl.zeros_like(x))
        acc = tl.dot(tl.trans(x), y, acc, input_precision=PREC)
    tl.store(out_ptr + pid_s * stride_os + offs_p[:, None] * R_REAL + offs_r[None, :], acc * scale,
             mask=(offs_p[:, None] < P) & (offs_r[None, :] < R_REAL))


# ---------------------------------------------------------------------------------------------------------------
# Block sizes and flags (the launchers are in sftfuse/kernels/lora.py, which also keeps ranks over 64 off these
# kernels: they hold the rank in one R tile)


def _rank_tile(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _config(dtype: torch.dtype, R: int, nf4: bool = False) -> dict:
    """Block sizes: small tiles under the interpreter; tensor-core tiles that compile without spills on GPU."""
    if interpreter_active():
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    return _gpu_config(dtype, R, nf4)


def _gpu_config(dtype: torch.dtype, R: int, nf4: bool = False) -> dict:
    if nf4:  # the decode's gathers and the uint8 tiles: a 32-deep K tile keeps shared memory in bounds, no spills
        return {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
    if R > 32:  # the (BLOCK_M, R) projection takes registers: a narrower tile avoids spills on sm_80
        return {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def _flags(dtype):
    """UPCAST: fp32 arithmetic under the interpreter (its bf16 is wrong); PREC: IEEE fp32 dots for fp32 inputs."""
    return {"UPCAST": interpreter_active(), "PREC": "ieee" if dtype == torch.float32 else "tf32"}


# ---------------------------------------------------------------------------------------------------------------
# Compile check: every configuration the launchers (in sftfuse/kernels/lora.py) pick on a GPU

_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _mm_spec(dtype, R, backward, is_nf4=False):
    ty = _TY[dtype]
    cfg = _gpu_config(dtype, R, is_nf4)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    sig = {n: f"*{ty}" for n in ("x_ptr", "w_ptr", "d_ptr", "v_ptr", "bias_ptr", "y_ptr", "z_ptr")}
    sig |= {n: "i32" for n in ("M", "N", "K", "R_REAL", "stride_xm", "stride_xk", "stride_wk", "stride_wn",
                               "stride_dk", "stride_dr", "stride_vr", "stride_vn", "stride_ym", "stride_yn",
                               "stride_zm", "seed", "thr")}
    sig |= {"scaling": "fp32", "z_scale": "fp32", "nf4_offset": "fp32", "packed_ptr": "*u8", "absmax_ptr": "*u8",
            "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "code_ptr": "*fp32"}
    # Unit inner strides as the launchers make them (contiguous x, W, A, B, y): pipelined async loads.
    units = ("stride_xk", "stride_wn", "stride_dr", "stride_vn", "stride_yn") if backward else \
        ("stride_xk", "stride_wk", "stride_dk", "stride_vr", "stride_yn")
    const = {n: 1 for n in units} | dict(
        IS_NF4=is_nf4, DOUBLE_QUANT=is_nf4, NF4_BLOCK=64, HAS_BIAS=not backward, IN_MASK=not backward,
        OUT_MASK=backward, UPCAST=False,
        PREC="ieee" if dtype == torch.float32 else "tf32", R=R, GROUP_M=8, **cfg)
    sig |= {n: "constexpr" for n in const}
    name = f"lora_mm_{'bwd' if backward else 'fwd'}{'_nf4' if is_nf4 else ''}_{ty}_r{R}"
    return KernelSpec(name, _lora_mm_kernel, sig, const, num_warps=warps, num_stages=stages,
                      divisible=("x_ptr", "w_ptr", "d_ptr", "v_ptr", "y_ptr", "z_ptr", "M", "N", "K",
                                 "stride_xm", "stride_ym", "stride_wk" if backward else "stride_wn"))


def _reduce_spec(dtype, R, masked):
    ty = _TY[dtype]
    sig = {"x_ptr": f"*{ty}", "y_ptr": f"*{ty}", "out_ptr": "*fp32"}
    sig |= {n: "i32" for n in ("M", "P", "R_REAL", "rows_per_split", "stride_xm", "stride_xp", "stride_ym",
                               "stride_os", "seed", "thr")}
    sig |= {"scale": "fp32"}
    const = {"stride_xp": 1, "IN_MASK": masked, "UPCAST": False, "PREC": "ieee" if dtype == torch.float32 else
             "tf32", "BLOCK_M": 64, "BLOCK_P": 64, "R": R}
    sig |= {n: "constexpr" for n in const}
    return KernelSpec(f"lora_reduce_{ty}_r{R}{'_masked' if masked else ''}", _lora_reduce_kernel, sig, const,
                      num_warps=4, num_stages=3, divisible=("x_ptr", "y_ptr", "out_ptr", "stride_xm", "P"))


def _specs():
    specs = [_mm_spec(torch.bfloat16, R, bwd) for R in (16, 64) for bwd in (False, True)]
    specs += [_mm_spec(torch.bfloat16, R, bwd, is_nf4=True) for R in (16, 64) for bwd in (False, True)]
    specs += [_mm_spec(torch.float32, 16, False),
              _mm_spec(torch.float32, 16, True)]
    specs += [_reduce_spec(torch.bfloat16, R, m) for R, m in ((16, True), (64, False))]
    return specs + [_reduce_spec(torch.float32, 16, True)]


register_kernel("lora", _specs)
