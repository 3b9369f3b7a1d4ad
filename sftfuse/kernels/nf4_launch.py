"""The CUDA (Triton) path of the NF4 matmul: its cost plan and launchers (math, format and the CPU path:
`sftfuse.kernels.nf4`; kernels: `sftfuse.kernels.nf4_triton`).

Two routes for y = x W_hat^T (and dx = dy W_hat), chosen per call by `plan`, a bytes/FLOPs model written down here:
- fused: the GEMM decodes 4-bit weights in its K loop. It reads N K / 2 bytes of weight instead of 2 N K, but
  every M tile decodes the whole weight again (about DECODE_OPS non-tensor instructions per weight per tile), and
  the decode competes with the MMAs for issue slots and registers (FUSED_EFF of the tensor-core peak).
- dequant: one Triton pass writes W_hat into a reused 16-bit buffer (0.5 + 2 bytes per weight, once), then the
  library GEMM (cuBLAS) at GEMM_EFF of peak. The buffer is kept per (device, dtype) and grown to the largest
  weight seen, so a training step allocates it once, not once per layer.
For each route: time = max(FLOPs / (peak x efficiency), bytes / HBM bandwidth) + decode instructions / ALU rate
+ a launch overhead, per launch. On an H100 at 4096 x 4096 in bf16 the fused route wins below about 256 tokens
(bound by weight bytes) and the dequant route above (compute-bound, where decoding once beats decoding per tile):
the same crossover the issue estimated. fp32 inputs always take the dequant route (no fp32 tensor-core dot to fuse
into). The constants are estimates, not measurements; `sftfuse.kernels.roofline` reads the same plan.

This file imports Triton only inside the launchers, and never imports `sftfuse.kernels.nf4` (which imports it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache

import torch
import torch.nn.functional as F

from sftfuse.kernels._registry import interpreter_active

# Device figures for the plan (FACTS.md): dense 16-bit tensor-core rate, HBM bandwidth, non-tensor instruction rate
# (SMs x 128 lanes x clock on H100; x 64 int32 lanes on A100) and a kernel launch's fixed cost.
GPU = {
    "h100": {"tflops": 989.0, "hbm_tbs": 3.35, "alu_tops": 60.0, "launch_s": 4e-6},
    "h200": {"tflops": 989.0, "hbm_tbs": 4.8, "alu_tops": 60.0, "launch_s": 4e-6},
    "a100": {"tflops": 312.0, "hbm_tbs": 2.04, "alu_tops": 19.5, "launch_s": 4e-6},
}
DECODE_OPS = 10  # per weight per decode: byte load share, shift/mask, code gather, scale multiply, cvt, smem store
FUSED_EFF = 0.5  # tensor-core efficiency of the decode-in-K-loop GEMM (128 x 128 x 32 tiles beside the decode)
GEMM_EFF = 0.8  # cuBLAS at large shapes
FUSED_MAX_TOKENS = 2048  # a hard cap on the fused route whatever the plan says (its tiles were tuned below it)
FUSED_TILE_M = (64, 128)  # nf4_triton._config: 64-row tiles up to SMALL_M = 64 tokens, 128 above


def gpu_props(device_props=None) -> dict:
    """The plan's device figures: a mapping with GPU's keys (missing keys from the H100), a GPU name ('h100',
    'h200', 'a100'), `torch.cuda` device properties (matched by name, else the H100's figures), or None (the H100)."""
    if device_props is None:
        return dict(GPU["h100"])
    if isinstance(device_props, str):
        if device_props.lower() not in GPU:
            raise ValueError(f"device_props: expected one of {tuple(GPU)} or a mapping, got {device_props!r}")
        return dict(GPU[device_props.lower()])
    if isinstance(device_props, Mapping):
        return {**GPU["h100"], **device_props}
    name = getattr(device_props, "name", "").lower()
    return dict(next((v for k, v in GPU.items() if k in name), GPU["h100"]))


def gemm_cost(name: str, m: int, n: int, k: int, g: Mapping, elem: int, extra_bytes: int = 0,
              eff: float = GEMM_EFF) -> dict:
    """One library GEMM (m, k) @ (k, n) in `elem`-byte values: its FLOPs, HBM bytes and predicted seconds."""
    flops, nbytes = 2 * m * n * k, (m * k + k * n + m * n) * elem + extra_bytes
    t = max(flops / (g["tflops"] * 1e12 * eff), nbytes / (g["hbm_tbs"] * 1e12)) + g["launch_s"]
    return {"name": name, "flops": flops, "bytes": nbytes, "time_s": t}


def _weight_bytes(n: int, k: int, blocksize: int, double_quant: bool) -> int:
    blocks = -(-n * k // blocksize)
    scales = blocks + 4 * -(-blocks // 256) if double_quant else 4 * blocks
    return (n * k + 1) // 2 + scales


def plan(M: int, N: int, K: int, device_props=None, *, dtype: torch.dtype = torch.bfloat16, blocksize: int = 64,
         double_quant: bool = True, transposed: bool = False) -> dict:
    """The route of one NF4 matmul, (M, K) x W_hat^T (N, K) -> (M, N) (transposed: (M, N) x W_hat -> (M, K)).

    Returns {"path": "fused" or "dequant", "fused": cost, "dequant": cost}, each cost {"flops", "bytes", "time_s",
    "decode_ops", "launches": [{"name", "flops", "bytes", "time_s"}, ...]}; the fused launch also carries "alu_ops",
    its decode instructions, which sit in the GEMM's K loop and add to its time.
    `fused` is None where only the dequant route serves: fp32 (no fp32 tensor-core dot to fuse into), and K not a
    multiple of the blocksize or a blocksize under the fused kernels' K tile (32), where a K tile would straddle
    blocks and need one scale per element instead of one per row.
    """
    g, elem = gpu_props(device_props), torch.empty(0, dtype=dtype).element_size()
    out_n, red_k = (K, N) if transposed else (N, K)
    w4 = _weight_bytes(N, K, blocksize, double_quant)
    act = (M * red_k + M * out_n) * elem
    flops = 2 * M * N * K
    deq_ops = N * K * DECODE_OPS
    alu = g["alu_tops"] * 1e12
    # a streaming pass: its decode instructions overlap its memory traffic (max, and no "alu_ops" to add on)
    deq = {"name": "W_hat = dequantize(W4) into the reused buffer", "flops": 0, "bytes": w4 + N * K * elem,
           "time_s": max((w4 + N * K * elem) / (g["hbm_tbs"] * 1e12), deq_ops / alu) + g["launch_s"]}
    mm = gemm_cost("y = x W_hat^T" if not transposed else "dx = dy W_hat", M, out_n, red_k, g, elem)
    dequant = {"launches": [deq, mm], "decode_ops": deq_ops, **{k: deq[k] + mm[k] for k in ("flops", "bytes",
                                                                                          "time_s")}}
    fused = None
    if dtype != torch.float32 and K % blocksize == 0 and blocksize >= 32:
        tiles = math.ceil(M / (FUSED_TILE_M[0] if M <= FUSED_TILE_M[0] else FUSED_TILE_M[1]))
        ops = deq_ops * tiles
        t = (max(flops / (g["tflops"] * 1e12 * FUSED_EFF), (w4 + act) / (g["hbm_tbs"] * 1e12)) + ops / alu
             + g["launch_s"])
        launch = {"name": "fused NF4 GEMM (decode in the K loop)", "flops": flops, "bytes": w4 + act, "alu_ops": ops,
                  "time_s": t}
        fused = {"launches": [launch], "decode_ops": ops, "flops": flops, "bytes": w4 + act, "time_s": t}
    use_fused = fused is not None and M <= FUSED_MAX_TOKENS and fused["time_s"] <= dequant["time_s"]
    return {"path": "fused" if use_fused else "dequant", "fused": fused, "dequant": dequant}


@lru_cache(maxsize=4096)
def _route(m, n, k, device, dtype, blocksize, double_quant, transposed, cap) -> str:
    """`plan`'s path, cached per shape (and per FUSED_MAX_TOKENS, `cap`): a step asks the same few shapes per layer."""
    props = next((v for name, v in GPU.items() if name in device), GPU["h100"])
    return plan(m, n, k, props, dtype=dtype, blocksize=blocksize, double_quant=double_quant,
                transposed=transposed)["path"]


def check_weight(q) -> None:
    """The sizes the kernels rely on, for every NF4Weight however it was made (bitsandbytes' views included):
    fewer than 2^31 values (int32 flat indices), and packed bytes and scales that cover the shape."""
    n = q.shape[0] * q.shape[1]
    if n >= 2**31:
        raise ValueError(f"q: {q.shape[0]} x {q.shape[1]} = {n} values; the NF4 kernels index with int32 (< 2^31)")
    if q.packed.numel() != (n + 1) // 2:
        raise ValueError(f"q: {q.packed.numel()} packed bytes for shape {tuple(q.shape)}, expected {(n + 1) // 2}")
    if q.absmax.numel() != -(-n // q.blocksize):
        raise ValueError(f"q: {q.absmax.numel()} block scales for {n} values at blocksize {q.blocksize}, "
                         f"expected {-(-n // q.blocksize)}")


def _q_args(q):
    """(the five weight pointers the kernels take, double_quant)."""
    dq = q.nested_absmax is not None
    dummy = q.absmax  # any pointer for the unused nested arguments
    return (q.packed, q.absmax, q.nested_absmax if dq else dummy, q.nested_code if dq else dummy, q.code), dq


_BUFFERS: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _buffer(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The reused dequantize buffer of (device, dtype), grown to `numel` values. Stream order makes reuse safe: a
    GEMM reading it is queued before the next layer's dequantize overwrites it."""
    key = (str(device), dtype)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < numel:
        _BUFFERS[key] = buf = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def dequantize_triton(q, dtype: torch.dtype, *, reuse: bool = False) -> torch.Tensor:
    """The dequantized weight (out, in) in `dtype`, equal to the PyTorch path; `reuse`: written into the shared
    buffer (valid until the next reuse=True call on that device and dtype)."""
    import triton

    from sftfuse.kernels import nf4_triton as kt

    check_weight(q)
    ptrs, dq = _q_args(q)
    n = q.shape[0] * q.shape[1]
    # the interpreter truncates fp32 -> bf16: write fp32 and let PyTorch round
    kernel_dtype = torch.float32 if interpreter_active() else dtype
    if reuse and kernel_dtype == dtype:
        out = _buffer(q.packed.device, dtype, n).view(q.shape)
    else:
        out = torch.empty(q.shape, dtype=kernel_dtype, device=q.packed.device)
    if n:
        kt._nf4_dequantize_kernel[(triton.cdiv(n, kt._DEQ_BLOCK),)](
            *ptrs, out, n, q.offset, DOUBLE_QUANT=dq, BLOCKSIZE=q.blocksize, BLOCK=kt._DEQ_BLOCK,
            enable_fp_fusion=False)  # mul then add, as torch
    if out.dtype == dtype:
        return out
    return _buffer(q.packed.device, dtype, n).view(q.shape).copy_(out) if reuse else out.to(dtype)


def matmul_triton(a: torch.Tensor, q, bias: torch.Tensor | None, *, transposed: bool) -> torch.Tensor:
    """transposed=False: y = a @ W^T + bias, a (M, K); transposed=True: dx = a @ W, a (M, N). The route is
    `plan`'s (the device's figures on CUDA, the H100's under the interpreter)."""
    import triton

    from sftfuse.kernels import nf4_triton as kt

    check_weight(q)
    a = a.contiguous()
    m = a.shape[0]
    n_out, k_in = q.shape
    if m == 0:  # no tokens: an empty result, nothing launched
        return a.new_empty(0, k_in if transposed else n_out)
    device = torch.cuda.get_device_name(a.device) if a.is_cuda else "h100"
    route = _route(m, n_out, k_in, device.lower(), a.dtype, q.blocksize, q.nested_absmax is not None, transposed,
                   FUSED_MAX_TOKENS)
    if route == "dequant":
        w = dequantize_triton(q, a.dtype, reuse=True)
        return a @ w if transposed else F.linear(a, w, bias)
    ptrs, dq = _q_args(q)
    fp32_dot = interpreter_active()  # the interpreter's bf16 dot is wrong: upcast there
    bm, bn, bk, warps = kt._config(m)
    aligned = k_in % q.blocksize == 0 and q.blocksize % bk == 0
    if not transposed:
        y = torch.empty(m, n_out, dtype=a.dtype, device=a.device)
        grid = (triton.cdiv(m, bm), triton.cdiv(n_out, bn))
        kt._nf4_matmul_fwd_kernel[grid](a, *ptrs, bias if bias is not None else a, y, m, n_out, k_in, q.offset,
                                        a.stride(0), y.stride(0), HAS_BIAS=bias is not None, DOUBLE_QUANT=dq,
                                        BLOCKSIZE=q.blocksize, ALIGNED=aligned, FP32_DOT=fp32_dot, BLOCK_M=bm,
                                        BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=3)
        return y
    dx = torch.empty(m, k_in, dtype=a.dtype, device=a.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(k_in, bk))
    kt._nf4_matmul_bwd_kernel[grid](a, *ptrs, dx, m, n_out, k_in, q.offset, a.stride(0), dx.stride(0),
                                    DOUBLE_QUANT=dq, BLOCKSIZE=q.blocksize, ALIGNED=aligned, FP32_DOT=fp32_dot,
                                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=3)
    return dx
