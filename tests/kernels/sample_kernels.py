"""Sample kernels for the compile-check tests: one that builds, one whose tile needs too much shared memory, one
whose operands load synchronously (K not known to be a multiple of 16: masked element loads, no cp.async)."""

import triton
import triton.language as tl

from sftfuse.kernels._registry import KernelSpec, register_kernel


@triton.jit
def _sample_matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kk = k * BLOCK_K + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + kk[None, :], mask=(offs_m[:, None] < M) & (kk[None, :] < K))
        b = tl.load(b_ptr + kk[:, None] * stride_bk + offs_n[None, :], mask=(kk[:, None] < K) & (offs_n[None, :] < N))
        acc += tl.dot(a, b)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(tl.bfloat16),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


SIG = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
       "stride_am": "i32", "stride_bk": "i32", "stride_cm": "i32",
       "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}


def _spec(name, bm, bn, bk, stages, k_divisible=True):
    return KernelSpec(name, _sample_matmul_kernel, SIG,
                      {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=stages,
                      divisible=("a_ptr", "b_ptr", "c_ptr", "stride_am", "stride_bk", "stride_cm")
                      + (("K",) if k_divisible else ()))


register_kernel("sample_matmul", lambda: [_spec("sample_matmul", 64, 64, 32, 3)])
# BLOCK_K=512: the A and B tiles take (128*512 + 512*128) * 2 B = 256 KiB of shared memory, over every limit.
register_kernel("sample_matmul_too_big", lambda: [_spec("sample_matmul_too_big", 128, 128, 512, 2)])
register_kernel("sample_matmul_sync", lambda: [_spec("sample_matmul_sync", 64, 64, 32, 3, k_divisible=False)])
