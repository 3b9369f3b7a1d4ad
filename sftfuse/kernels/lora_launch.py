"""The CUDA (Triton) path of LoRA linear: its launchers and launch plan (math, memory plan, dropout mask and the
PyTorch path: `sftfuse.kernels.lora`; kernels: `sftfuse.kernels.lora_triton`).

Per layer, t = dropout(x) A^T and u = dy B are formed once (no per-tile recompute, the dropout mask applied once),
the base products are library GEMMs (cuBLAS; an NF4 base by `nf4_launch.plan`: fused decode GEMM or dequantize into
a reused buffer + cuBLAS), and the rank-r terms are accumulated into them with addmm_ (alpha = s inside the GEMM).
Only the dropout-bearing rank-r pieces are Triton kernels, the keep mask hashed in registers from (seed, row,
column) exactly as `sftfuse.kernels.lora.dropout_mask`:
    forward   t = x A^T (or the proj kernel under dropout); y = x W^T + b; y += s t B^T             3 launches
    backward  u = dy B; dx = dy W; dx += s u A (or the update kernel, masked); dA = s u^T x (or the
              reduce kernel over dropout(x), then one sum); dB = s dy^T t                          5 (6) launches
The tensor-core FLOPs are the base GEMMs' plus each rank-r GEMM once: `plan` lists every launch with its FLOPs and
HBM bytes, for `sftfuse.kernels.roofline`. Zero tokens launch nothing.
"""

from __future__ import annotations

import torch

from sftfuse.kernels._registry import interpreter_active


def dropout_threshold(p: float) -> int:
    """Keep an element iff its signed 32-bit hash is >= this (`sftfuse.kernels.lora.dropout_threshold`)."""
    return min(round(p * 2.0**32), (1 << 32) - 1) - (1 << 31)



def _base_mm(a, base, bias, *, transposed):
    """a @ W^T + bias (transposed=False) or a @ W (True) for a dense or NF4 base, on the CUDA path."""
    if isinstance(base, torch.Tensor):
        if transposed:
            return a @ base
        return torch.addmm(bias, a, base.T) if bias is not None else a @ base.T
    from sftfuse.kernels.nf4 import matmul_triton

    return matmul_triton(a, base, bias, transposed=transposed)


PROGRAMS = 264  # programs to aim for in a split launch: two per SM of an H100 (132)


def _pad_cols(a: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    """`a` (rows, n) with its columns zero-padded to a multiple of `multiple` (a itself where they already are).

    A 16-bit operand whose row stride is not a multiple of 16 elements has rows at 2-byte alignment: Triton then
    loads it element by element and cannot stage it through cp.async. Real models' widths are multiples of 16; an
    odd one pays this copy instead of a kernel without async copies."""
    n = a.shape[1]
    if n % multiple == 0:
        return a
    out = a.new_zeros(a.shape[0], -(-n // multiple) * multiple)
    out[:, :n] = a
    return out


def _aligned(dtype: torch.dtype, n: int) -> bool:
    """Rows of width n in dtype load as vectors (cp.async) as they are: 4-byte elements, or n a multiple of 16."""
    return torch.empty(0, dtype=dtype).element_size() >= 4 or n % 16 == 0


def _launch_proj(x, A, *, scale, seed, thr):
    """t = scale * dropout(x) A^T (M, r): one sweep over x, the mask in registers (`_lora_proj_kernel`)."""
    import triton

    from sftfuse.kernels import lora_triton as kt

    if not _aligned(x.dtype, x.shape[1]):  # zero columns add nothing to x A^T; the mask keys keep their columns
        x, A = _pad_cols(x), _pad_cols(A)
    M, K = x.shape
    t = torch.empty(M, A.shape[0], device=x.device, dtype=x.dtype)
    cfg = kt.proj_config(x.dtype, A.shape[0], K % 16 == 0)  # K % 16: Triton's divisibility specialization
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    kt._lora_proj_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
        x, A, t, M, K, A.shape[0], x.stride(0), x.stride(1), A.stride(1), A.stride(0), t.stride(0), scale, seed, thr,
        IN_MASK=True, **kt._flags(x.dtype), R=kt._rank_tile(A.shape[0]), **cfg, num_warps=warps, num_stages=stages)
    return t


def _split(tiles: int, other_tiles: int, block: int, size: int) -> tuple[int, int]:
    """(programs along a looped axis, elements each) so that about PROGRAMS programs run, each looping over at least
    one tile (two under the interpreter, so that tests take the loop)."""
    import triton

    split = min(tiles, max(1, tiles // 2) if interpreter_active() else max(1, triton.cdiv(PROGRAMS, other_tiles)))
    per = triton.cdiv(tiles, split) * block
    return triton.cdiv(size, per), per


def _launch_update(y, z, V, *, scale, seed, thr):
    """y += scale * mask * (z V) in place, y (M, N), z (M, r), V (r, N) contiguous (`_lora_update_kernel`)."""
    import triton

    from sftfuse.kernels import lora_triton as kt

    M, N = y.shape
    Vp = _pad_cols(V)  # r x N, aligned rows in any dtype (a few KB; it frees registers in the fp32 odd build)
    cfg = kt.update_config(y.dtype, z.shape[1], Vp.shape[1] % 16 == 0)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    tiles_m = triton.cdiv(M, cfg["BLOCK_M"])
    split, cols = _split(triton.cdiv(N, cfg["BLOCK_N"]), tiles_m, cfg["BLOCK_N"], N)
    kt._lora_update_kernel[(tiles_m, split)](
        y, z, Vp, M, N, Vp.shape[1], z.shape[1], cols, y.stride(0), z.stride(0), Vp.stride(0), Vp.stride(1),
        scale, seed, thr, OUT_MASK=True, **kt._flags(y.dtype), R=kt._rank_tile(z.shape[1]), **cfg, num_warps=warps,
        num_stages=stages)
    return y


def _launch_reduce(x, y, *, scale, seed, thr):
    """(r, P) = scale * y^T @ dropout(x) in x's dtype, x (M, P), y (M, r), from fp32 partial sums over token splits."""
    import triton

    from sftfuse.kernels import lora_triton as kt

    P_real = x.shape[1]
    if not _aligned(x.dtype, P_real):
        x = _pad_cols(x)
    M, P = x.shape
    cfg = kt.reduce_config(x.dtype, y.shape[1], P % 16 == 0)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    tiles_p = triton.cdiv(P, cfg["BLOCK_P"])
    split, rows = _split(triton.cdiv(M, cfg["BLOCK_M"]), tiles_p, cfg["BLOCK_M"], M)
    out = torch.empty(split, y.shape[1], P, device=x.device, dtype=torch.float32)
    kt._lora_reduce_kernel[(tiles_p, split)](
        x, y, out, M, P, y.shape[1], rows, x.stride(0), x.stride(1), y.stride(0), out.stride(0), scale, seed, thr,
        IN_MASK=True, **kt._flags(x.dtype), R=kt._rank_tile(y.shape[1]), **cfg, num_warps=warps, num_stages=stages)
    dA = out.sum(0, dtype=x.dtype)  # one launch: fp32 accumulation, one rounding
    return dA if P == P_real else dA[:, :P_real].contiguous()


def lora_fwd_triton(x, base, A, B, s, bias, seed, p):
    """`lora_linear_fwd` on the Triton path, r <= 64: (y (M, N), t (M, r)).

    t = dropout(x) A^T once (the proj kernel under dropout, else one small GEMM); y = x W^T + b (cuBLAS, or NF4
    by nf4's cost plan), then y += s t B^T as an addmm_ (cuBLAS reads and writes y once, no (M, N) temporary)."""
    x, A, B = x.contiguous(), A.contiguous(), B.contiguous()
    if x.shape[0] == 0:  # no tokens: nothing to launch (a grid of zero programs is an error)
        return x.new_empty(0, B.shape[0]), x.new_empty(0, A.shape[0])
    t = _launch_proj(x, A, scale=1.0 / (1.0 - p), seed=seed, thr=dropout_threshold(p)) if p > 0 else x @ A.T
    y = _base_mm(x, base, bias, transposed=False)
    return y.addmm_(t, B.T, alpha=s), t


def lora_bwd_triton(dy, x, t, base, A, B, s, seed, p, need_dx):
    """`lora_linear_bwd` on the Triton path, r <= 64: (dx (M, K) or None, dA (r, K), dB (N, r)).

    u = dy B once; dx = dy W (cuBLAS or NF4) + s/(1-p) mask (u A) (addmm_, or the update kernel under dropout);
    dA = s/(1-p) u^T dropout(x) (one GEMM, or the reduce kernel under dropout); dB = s dy^T t (one GEMM)."""
    dy, x, t, A, B = dy.contiguous(), x.contiguous(), t.contiguous(), A.contiguous(), B.contiguous()
    if dy.shape[0] == 0:
        dx = x.new_zeros(0, x.shape[1]) if need_dx else None
        return dx, torch.zeros_like(A), torch.zeros_like(B)
    thr = dropout_threshold(p)
    u = dy @ B  # (M, r)
    dx = None
    if need_dx:
        dx = _base_mm(dy, base, None, transposed=True)
        if p > 0:
            _launch_update(dx, u, A, scale=s / (1.0 - p), seed=seed, thr=thr)
        else:
            dx.addmm_(u, A, alpha=s)
    if p > 0:
        dA = _launch_reduce(x, u, scale=s / (1.0 - p), seed=seed, thr=thr)
    else:
        dA = torch.addmm(x.new_empty(A.shape), u.T, x, beta=0, alpha=s)  # beta = 0: the input is never read
    dB = torch.addmm(x.new_empty(B.shape), dy.T, t, beta=0, alpha=s)  # (N, r)
    return dx, dA, dB


# Cost plan of the Triton path, for `sftfuse.kernels.roofline`: what each launch reads, writes and computes.


def plan(M: int, N: int, K: int, r: int, device_props=None, *, p: float = 0.0, nf4: bool = False,
         dtype: torch.dtype = torch.bfloat16, need_dx: bool = True) -> dict:
    """The launches of one LoRA linear (forward + backward) on the CUDA path and their predicted costs.

    Args:
        M, N, K, r: tokens, out-features, in-features, rank. device_props: as `sftfuse.kernels.nf4_launch.gpu_props`
            takes it (a mapping of GPU's keys tflops, hbm_tbs, alu_tops, launch_s, or 'h100' / 'a100'; None: the
            H100). p: dropout. nf4: an NF4 base (its launches from `nf4_launch.plan`). dtype: x's. need_dx: the
            input gradient is formed.
    Returns:
        {"launches": [{"name", "flops", "bytes", "time_s"}, ...], "flops", "bytes", "time_s",
         "base_flops" (x W^T and dy W), "adapter_flops" (the four rank-r GEMMs, each once), "nf4_paths"}.
    """
    from sftfuse.kernels.nf4_launch import gemm_cost, gpu_props
    from sftfuse.kernels.nf4_launch import plan as nf4_plan

    g, e = gpu_props(device_props), torch.empty(0, dtype=dtype).element_size()
    launches, nf4_paths = [], []

    def gemm(name, m, n, k, extra_bytes=0):
        launches.append(gemm_cost(name, m, n, k, g, e, extra_bytes))

    def base(name, transposed):
        if not nf4:
            return gemm(name, M, K if transposed else N, N if transposed else K)
        pl = nf4_plan(M, N, K, g, dtype=dtype, transposed=transposed)
        nf4_paths.append(pl["path"])
        launches.extend(pl[pl["path"]]["launches"])

    gemm("t = dropout(x) A^T" if p > 0 else "t = x A^T", M, r, K)
    base("y = x W^T + b", False)
    gemm("y += s t B^T", M, N, r, extra_bytes=M * N * e)  # beta = 1 reads y
    gemm("u = dy B", M, r, N)
    if need_dx:
        base("dx = dy W", True)
        gemm("dx += s mask (u A)", M, K, r, extra_bytes=M * K * e)
    gemm("dA = s u^T dropout(x)", r, K, M)
    gemm("dB = s dy^T t", N, r, M)
    tot = {k: sum(x[k] for x in launches) for k in ("flops", "bytes", "time_s")}
    base_flops = 2 * M * N * K * (2 if need_dx else 1)
    adapter_flops = 2 * M * r * (3 * N + 2 * K + (K if need_dx else 0))  # t, t B^T, u, [u A], dA, dB
    return {"launches": launches, **tot, "base_flops": base_flops, "adapter_flops": adapter_flops,
            "nf4_paths": nf4_paths}


