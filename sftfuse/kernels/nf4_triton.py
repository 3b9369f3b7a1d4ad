"""Triton kernels of the NF4 matmul (math and format: sftfuse/kernels/nf4.py; plan and launchers: nf4_launch.py).

- `_nf4_matmul_fwd_kernel`: y (M, N) = x (M, K) @ W^T; the K loop decodes a (BLOCK_K, BLOCK_N) tile of W^T.
- `_nf4_matmul_bwd_kernel`: dx (M, K) = dy (M, N) @ W; the N loop decodes a (BLOCK_N, BLOCK_K) tile of W.
- `_nf4_dequantize_kernel`: W in the compute dtype, for the large-token route (dequantize + library GEMM).
Each decode reads 0.5 byte per weight plus one uint8 scale per block; the 16-entry NF4 code and the 256-entry
nested map are L1-resident gathers. Accumulation is fp32, the output is cast once at the store. Under the
interpreter (bf16 arithmetic and bf16 tl.dot are wrong there) FP32_DOT upcasts both operands, and the dequantize
kernel writes fp32 that PyTorch rounds (the interpreter's fp32->bf16 cast truncates).
"""

from __future__ import annotations

import itertools

import triton
import triton.language as tl

from sftfuse.kernels._registry import KernelSpec, register_kernel


@triton.jit
def _codes(packed_ptr, code_ptr, flat, mask):
    """NF4 code values (fp32) of the flat weight indices `flat` (any tile shape)."""
    byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    return tl.load(code_ptr + ((byte >> ((1 - (flat & 1)) * 4)) & 15))  # element 2i in the high nibble


@triton.jit
def _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, blk, mask, DOUBLE_QUANT: tl.constexpr):
    """fp32 absmax of blocks `blk`, decoding the double quantization: dyn[qa] * absmax2[blk // 256] + offset."""
    if DOUBLE_QUANT:
        qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + qa) * tl.load(nested_absmax_ptr + blk // 256, mask=mask, other=0.0)
        return scale + offset
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _nf4_matmul_fwd_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, bias_ptr, y_ptr,
    # sizes and the nested offset
    M, N, K, offset,
    # strides (inner strides are 1)
    stride_xm, stride_ym,
    # meta-parameters
    HAS_BIAS: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, ALIGNED: tl.constexpr,
    FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_x = offs_m.to(tl.int64)[:, None] * stride_xm  # int64: M x K may pass 2^31
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + rows_x + kk[None, :],
                    mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
        wmask = (kk[:, None] < K) & (offs_n[None, :] < N)
        flat = offs_n[None, :] * K + kk[:, None]  # (BLOCK_K, BLOCK_N) of W^T
        if ALIGNED:  # the K tile lies in one block per row of W: one scale per column of the tile
            scale = _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, (offs_n * K + k0) // BLOCKSIZE,
                            offs_n < N, DOUBLE_QUANT)[None, :]
        else:
            scale = _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, flat // BLOCKSIZE, wmask,
                            DOUBLE_QUANT)
        w = tl.where(wmask, _codes(packed_ptr, code_ptr, flat, wmask) * scale, 0.0)
        if FP32_DOT:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _nf4_matmul_bwd_kernel(
    # pointers
    dy_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, dx_ptr,
    # sizes and the nested offset
    M, N, K, offset,
    # strides (inner strides are 1)
    stride_dym, stride_dxm,
    # meta-parameters
    DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, ALIGNED: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    rows_dy = offs_m.to(tl.int64)[:, None] * stride_dym  # int64: M x N may pass 2^31
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn = n0 + offs_n
        dy = tl.load(dy_ptr + rows_dy + nn[None, :],
                     mask=(offs_m[:, None] < M) & (nn[None, :] < N), other=0.0)
        wmask = (nn[:, None] < N) & (offs_k[None, :] < K)
        flat = nn[:, None] * K + offs_k[None, :]  # (BLOCK_N, BLOCK_K) of W
        if ALIGNED:  # the K tile lies in one block per row of W: one scale per row of the tile
            scale = _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                            (nn * K + pid_k * BLOCK_K) // BLOCKSIZE, nn < N, DOUBLE_QUANT)[:, None]
        else:
            scale = _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, flat // BLOCKSIZE, wmask,
                            DOUBLE_QUANT)
        w = tl.where(wmask, _codes(packed_ptr, code_ptr, flat, wmask) * scale, 0.0)
        if FP32_DOT:
            acc += tl.dot(dy.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(dy, w.to(dy.dtype))
    tl.store(dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.jit
def _nf4_dequantize_kernel(
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, out_ptr,  # pointers
    numel, offset,  # size and the nested offset
    DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: numel may near 2^31
    mask = offs < numel
    scale = _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, offs[None, :] // BLOCKSIZE,
                    mask[None, :], DOUBLE_QUANT)
    w = _codes(packed_ptr, code_ptr, offs[None, :], mask[None, :]) * scale
    tl.store(out_ptr + offs[None, :], w.to(out_ptr.dtype.element_ty), mask=mask[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Block sizes (the launchers, `matmul_triton` and `dequantize_triton`, are in sftfuse/kernels/nf4_launch.py)


def _config(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK over N, BLOCK over K, warps) for `m` tokens.

    K tiles of 64 or 32 divide every blocksize >= 64: with K % blocksize == 0 a tile row then lies in one block
    (ALIGNED: one scale per row; the launcher sends every other shape to the dequantize route). The small tile is
    64 rows, the least a Hopper warpgroup MMA (wgmma) takes: rows past the few tokens cost tensor-core FLOPs, which
    are free while the weight read bounds the kernel. The large tile decodes 32 x 128 weights per step: at 64 x 128
    the decode spilled 8-16 bytes on sm_80.
    """
    if m <= SMALL_M:
        return 64, 64, 32, 4  # decode-like: many N tiles keep the SMs busy while the weight read dominates
    return 128, 128, 32, 8


SMALL_M = 64
_DEQ_BLOCK = 1024  # values per program of the dequantize kernel


# ---------------------------------------------------------------------------------------------------------------
# Registration: every configuration the launchers may pick for bf16 at blocksize 64 (fp32 and K not a multiple of
# the blocksize take the dequantize route): double quant or not, both tiles, with the divisibility real shapes give
# (every pointer 16-byte aligned, N, K and the row strides multiples of 16); for the compile check. (The numerics
# check for `sftfuse verify` needs the reference: it is registered in nf4.py.)

_Q = {"packed_ptr": "*u8", "code_ptr": "*fp32"}


def _qsig(dq: bool) -> dict[str, str]:
    return {**_Q, "absmax_ptr": "*u8" if dq else "*fp32", "nested_absmax_ptr": "*fp32" if dq else "*u8",
            "nested_code_ptr": "*fp32" if dq else "*u8"}


def _ptrs(sig: dict[str, str]) -> tuple[str, ...]:
    return tuple(k for k, v in sig.items() if v.startswith("*"))


def _specs() -> list[KernelSpec]:
    specs = []
    for dq, m in itertools.product((True, False), (SMALL_M, 128 + SMALL_M)):
        bm, bn, bk, warps = _config(m)
        meta = {"DOUBLE_QUANT": dq, "BLOCKSIZE": 64, "ALIGNED": True, "FP32_DOT": False, "BLOCK_M": bm}
        fwd_sig = {"x_ptr": "*bf16", **_qsig(dq), "bias_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32",
                   "K": "i32", "offset": "fp32", "stride_xm": "i32", "stride_ym": "i32"}
        fwd_sig.update({k: "constexpr" for k in ("HAS_BIAS", "DOUBLE_QUANT", "BLOCKSIZE", "ALIGNED", "FP32_DOT",
                                                 "BLOCK_M", "BLOCK_N", "BLOCK_K")})
        specs.append(KernelSpec("nf4_matmul_fwd", _nf4_matmul_fwd_kernel, fwd_sig,
                                {**meta, "HAS_BIAS": False, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps,
                                divisible=(*_ptrs(fwd_sig), "N", "K", "stride_xm", "stride_ym")))
        bwd_sig = {"dy_ptr": "*bf16", **_qsig(dq), "dx_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
                   "offset": "fp32", "stride_dym": "i32", "stride_dxm": "i32"}
        bwd_sig.update({k: "constexpr" for k in ("DOUBLE_QUANT", "BLOCKSIZE", "ALIGNED", "FP32_DOT", "BLOCK_M",
                                                 "BLOCK_N", "BLOCK_K")})
        specs.append(KernelSpec("nf4_matmul_bwd", _nf4_matmul_bwd_kernel, bwd_sig,
                                {**meta, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps,
                                divisible=(*_ptrs(bwd_sig), "N", "K", "stride_dym", "stride_dxm")))
    for dq in (True, False):
        sig = {**_qsig(dq), "out_ptr": "*bf16", "numel": "i32", "offset": "fp32", "DOUBLE_QUANT": "constexpr",
               "BLOCKSIZE": "constexpr", "BLOCK": "constexpr"}
        specs.append(KernelSpec("nf4_dequantize", _nf4_dequantize_kernel, sig,
                                {"DOUBLE_QUANT": dq, "BLOCKSIZE": 64, "BLOCK": _DEQ_BLOCK},
                                divisible=(*_ptrs(sig), "numel")))
    return specs


register_kernel("nf4", _specs)
