"""Triton kernels of LoRA linear (the math, the memory plan and the dropout mask: `sftfuse.kernels.lora`).

`_lora_mm_kernel` is one matmul with the adapter folded in. Forward: y = x W^T + b + s t B^T, where the same K
loop that reads x for x W^T also forms t = dropout(x) A^T (an extra R-wide dot, the mask regenerated in registers)
and the programs of the first column block store t. Backward (dx): dx = dy W + s mask (u A) / (1 - p), the K loop
over dy forming u = dy B alongside. An NF4 base (IS_NF4) is decoded in registers inside the K loop (nibble ->
code -> block scale, double-quantized scales included; bitsandbytes' layout as in `sftfuse.kernels.nf4`) up to
nf4's FUSED_MAX_TOKENS tokens; above, the GEMM is compute-bound and the weight is dequantized once instead.
`_lora_reduce_kernel` forms dA^T = s/(1-p) dropout(x)^T u and dB = s dy^T t, split over tokens for parallelism,
fp32 partials summed after.
Limits: r <= 64 (one R tile; larger ranks take the PyTorch path). fp32 inputs use IEEE fp32 dots (no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sftfuse.kernels._registry import (
    CheckContext,
    CheckResult,
    KernelSpec,
    interpreter_active,
    max_error,
    register_check,
    register_kernel,
    tolerance,
)
from sftfuse.kernels.lora import (
    _lora_bwd_torch,
    _lora_fwd_torch,
    dropout_mask,
    dropout_threshold,
    lora_linear_bwd,
    lora_linear_fwd,
    lora_linear_ref,
)
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
    return {"UPCAST": interpreter_active(), "PREC": "ieee" if dtype == torch.float32 else "tf32"}


def _weight(base, x, M):
    """(dense W or None, NF4 kernel args): NF4 decodes in registers up to FUSED_MAX_TOKENS tokens (bound by
    weight bytes); above, the GEMM is compute-bound and one dequantize pass is cheaper than decoding per M tile."""
    if isinstance(base, torch.Tensor):
        return base.contiguous(), (x, x, x, x, x, 0.0), {"IS_NF4": False, "DOUBLE_QUANT": False, "NF4_BLOCK": 64}
    from sftfuse.kernels.nf4 import FUSED_MAX_TOKENS, dequantize_nf4

    if M > FUSED_MAX_TOKENS or (x.dtype == torch.float32 and not interpreter_active()):
        return dequantize_nf4(base, x.dtype), (x, x, x, x, x, 0.0), {"IS_NF4": False, "DOUBLE_QUANT": False,
                                                                     "NF4_BLOCK": 64}
    dq = base.nested_absmax is not None
    q = (base.packed, base.absmax, base.nested_absmax if dq else base.code, base.nested_code if dq else base.code,
         base.code, float(base.offset))
    return None, q, {"IS_NF4": True, "DOUBLE_QUANT": dq, "NF4_BLOCK": base.blocksize}


def _launch_mm(x, w, q, nf4_flags, d, v, bias, y, z, *, n, k, w_strides, d_strides, v_strides, scaling, z_scale,
               seed, thr, in_mask, out_mask):
    M, R = x.shape[0], _rank_tile(z.shape[1])
    cfg = _config(x.dtype, R, nf4_flags["IS_NF4"])
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _lora_mm_kernel[grid](
        x, w if w is not None else x, d, v, bias if bias is not None else y, y, z, *q,
        M, n, k, z.shape[1],
        x.stride(0), x.stride(1), *w_strides, *d_strides, *v_strides, y.stride(0), y.stride(1), z.stride(0),
        scaling, z_scale, seed, thr,
        **nf4_flags, HAS_BIAS=bias is not None, IN_MASK=in_mask, OUT_MASK=out_mask, **_flags(x.dtype),
        R=R, GROUP_M=8, **cfg, num_warps=warps, num_stages=stages)


def _launch_reduce(x, y, *, scale, seed, thr, in_mask):
    """(P, r) = scale * [mask](x)^T @ y, x (M, P), y (M, r), in fp32 partial sums over token splits."""
    M, P = x.shape
    R = _rank_tile(y.shape[1])
    block_m, block_p = (32, 32) if interpreter_active() else (64, 64)
    tiles_m = triton.cdiv(M, block_m)
    split = min(tiles_m, 2 if interpreter_active() else max(1, 264 // triton.cdiv(P, block_p)))
    rows = triton.cdiv(tiles_m, split) * block_m
    split = triton.cdiv(M, rows)
    out = torch.empty(split, P, y.shape[1], device=x.device, dtype=torch.float32)
    _lora_reduce_kernel[(triton.cdiv(P, block_p), split)](
        x, y, out, M, P, y.shape[1], rows, x.stride(0), x.stride(1), y.stride(0), out.stride(0),
        scale, seed, thr, IN_MASK=in_mask, **_flags(x.dtype), BLOCK_M=block_m, BLOCK_P=block_p, R=R,
        num_warps=4, num_stages=1 if interpreter_active() else 3)
    return out.sum(0)


def lora_fwd_triton(x, base, A, B, s, bias, seed, p):
    if A.shape[0] > 64:  # one R tile holds r <= 64
        return _lora_fwd_torch(x, base, A, B, s, bias, seed, p)
    x, A, B = x.contiguous(), A.contiguous(), B.contiguous()
    M, K = x.shape
    N = B.shape[0]
    t = torch.empty(M, A.shape[0], device=x.device, dtype=x.dtype)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    W, q, nf4_flags = _weight(base, x, M)
    # W^T (K, N) of a contiguous (N, K) W; the NF4 flat index uses the same strides
    _launch_mm(x, W, q, nf4_flags, A, B, bias, y, t, n=N, k=K, w_strides=(1, K), d_strides=(A.stride(1), A.stride(0)),
               v_strides=(B.stride(1), B.stride(0)), scaling=s, z_scale=1.0 / (1.0 - p), seed=seed,
               thr=dropout_threshold(p), in_mask=p > 0, out_mask=False)
    return y, t


def lora_bwd_triton(dy, x, t, base, A, B, s, seed, p, need_dx):
    if A.shape[0] > 64:
        return _lora_bwd_torch(dy, x, t, base, A, B, s, seed, p, need_dx)
    dy, x, t, A, B = dy.contiguous(), x.contiguous(), t.contiguous(), A.contiguous(), B.contiguous()
    M, N = dy.shape
    K = x.shape[1]
    thr = dropout_threshold(p)
    u = torch.empty(M, A.shape[0], device=dy.device, dtype=dy.dtype)
    dx = None
    if not need_dx:
        u = dy @ B
    else:  # dx = dy W + s mask (u A) / (1 - p), u = dy B from the same K loop; W (N, K) read as is
        W, q, nf4_flags = _weight(base, dy, M)
        dx = torch.empty(M, K, device=dy.device, dtype=dy.dtype)
        _launch_mm(dy, W, q, nf4_flags, B, A, None, dx, u, n=K, k=N, w_strides=(K, 1),
                   d_strides=(B.stride(0), B.stride(1)),
                   v_strides=(A.stride(0), A.stride(1)), scaling=s / (1.0 - p), z_scale=1.0, seed=seed, thr=thr,
                   in_mask=False, out_mask=p > 0)
    dA = _launch_reduce(x, u, scale=s / (1.0 - p), seed=seed, thr=thr, in_mask=p > 0).T.to(x.dtype)
    dB = _launch_reduce(dy, t, scale=s, seed=seed, thr=thr, in_mask=False).to(x.dtype)
    return dx, dA.contiguous(), dB


# ---------------------------------------------------------------------------------------------------------------
# Compile check and `sftfuse verify`

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


def _check(ctx: CheckContext) -> None:
    """lora_linear (Triton path) forward and backward against the fp64 reference: 16-bit and NF4 bases, with and
    without dropout. The NF4 reference multiplies by the weight dequantized on the PyTorch path."""
    from sftfuse.kernels.nf4 import _dequantize_torch, quantize_nf4

    shapes = [(2048, 2048, 4096, 16), (1024, 576, 1536, 64)] if ctx.large else [(67, 70, 45, 8)]
    for dtype in ctx.dtypes:
        for (M, K, N, r), nf4, p in [(s, nf4, p) for s in shapes for nf4 in (False, True) for p in (0.0, 0.1)]:
            g = torch.Generator(device="cpu").manual_seed(0)

            def rnd(*shape, scale=1.0, g=g, dtype=dtype):
                return (torch.randn(*shape, generator=g) * scale).to(device=ctx.device, dtype=dtype)

            x, W, A, B, dy = rnd(M, K), rnd(N, K, scale=K**-0.5), rnd(r, K, scale=K**-0.5), rnd(N, r), rnd(M, N)
            base = quantize_nf4(W) if nf4 else W
            W = _dequantize_torch(base, dtype) if nf4 else W
            seed = 1234
            y, t = lora_linear_fwd(x, base, A, B, 2.0, seed=seed, p=p)
            dx, dA, dB = lora_linear_bwd(dy, x, t, base, A, B, 2.0, seed=seed, p=p)
            keep = dropout_mask(seed, M, K, p, device=ctx.device) if p > 0 else None
            leaves = [v.double().requires_grad_() for v in (x, A, B)]
            y64 = lora_linear_ref(leaves[0], W, leaves[1], leaves[2], 2.0, keep=keep, p=p, upcast=True)
            refs = [y64.detach(), *torch.autograd.grad(y64, leaves, dy.double())]
            lows = None
            if dtype != torch.float32:
                lo = [v.detach().requires_grad_() for v in (x, A, B)]
                yb = lora_linear_ref(lo[0], W, lo[1], lo[2], 2.0, keep=keep, p=p)
                lows = [yb.detach(), *torch.autograd.grad(yb, lo, dy)]
            for i, (name, ours) in enumerate(zip(("y", "dx", "dA", "dB"), (y, dx, dA, dB), strict=True)):
                be = max_error(lows[i], refs[i]) if lows else None
                ctx.results.append(CheckResult(f"lora_linear {name} p={p}", "triton", str(dtype).split(".")[-1],
                                               f"{M}x{K}->{N} r={r} {'nf4' if nf4 else 'dense'}",
                                               max_error(ours, refs[i]), tolerance(refs[i], dtype, be)))


register_check("lora", _check)
