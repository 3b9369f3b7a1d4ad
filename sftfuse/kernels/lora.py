"""LoRA linear: y = x W^T + b + s * (dropout(x) A^T) B^T over a frozen 16-bit or NF4 base, forward and backward.

x (M, K) tokens x in-features, W (N, K) frozen, A (r, K), B (N, r), s = alpha / r (alpha / sqrt(r), rsLoRA).
Dropout keeps x with probability 1 - p and scales by 1 / (1 - p); its mask is a pure function of the adapter's seed,
so no dropped-out copy of x and no mask is ever stored. The Triton kernels hash it from (seed, row, column) in
registers (`dropout_mask`); the PyTorch path draws the dropped positions from torch's generator seeded by it, as
geometric gaps (`cpu_drop_positions`, `sftfuse.kernels.dropout`), in the forward and again in the backward.

Forward: t = dropout(x) A^T (M, r); y = x W^T + b + s t B^T. Saved: x (a view of the caller's tensor, so layers
reading the same x share it), t and the seed. PEFT saves, per adapted layer, an fp32 dropped-out copy of x and
its mask: 5 bytes per element of x, against our 2 bytes shared by every layer that reads that x (bf16).
Backward, with u = dy B (M, r):
    dx = dy W + s * mask * (u A) / (1 - p)       dB = s dy^T t       dA = s u^T dropout(x)
The frozen base never gets a gradient. Accumulation is fp32 on both paths.

PyTorch path (CPU, this file): the same plan in plain ops, GEMMs in x's dtype or in fp32 where that is faster
on this CPU (`sftfuse.kernels._cpu`; a dense base weight is then cast per call, a transient copy; over an NF4
base the adapter stays in x's dtype and nf4_matmul makes that choice around its decoded tiles), the adapter terms
accumulated into the big products with addmm_ (no (M, N) temporary in the forward; dx = (u A) masked, then
dy W added inside one GEMM). The mask costs about p M K draws and writes (the dropped positions zeroed in a copy
of x, and in u A), not a pass per element: per-element masks (a hash-table gather, then a draw, a compare and
torch.where per element) took a third of an end-to-end step on an AMX CPU, where the GEMMs are fast. An NF4 base goes
through `nf4_matmul_fwd` / `nf4_matmul_bwd`. Triton path: the kernels in `sftfuse.kernels.lora_triton`, launched
from here; ranks above 64 (one R tile) take the PyTorch path, with a warning once per process.
"""

from __future__ import annotations

import torch

from sftfuse.kernels._cpu import gemm_dtype
from sftfuse.kernels._registry import (
    CheckContext,
    CheckResult,
    max_error,
    register_check,
    tolerance,
    use_triton,
    warn_once,
)
from sftfuse.kernels.dropout import drop_mask, drop_positions, dropped_copy, zero_at

# Odd 32-bit multipliers (golden ratio, murmur3) and the shift of the per-element mixer.
_C1, _C2, _C3, _C4 = 0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F
_M32 = 0xFFFFFFFF


def _signed32(c: int) -> int:
    return c - (1 << 32) if c >= 1 << 31 else c


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finalizer on int64 holding uint32 values (products wrap; the low 32 bits stay exact)."""
    h = h ^ (h >> 16)
    h = (h * _C2) & _M32
    h = h ^ (h >> 13)
    h = (h * _C3) & _M32
    return h ^ (h >> 16)


_KEY_BITS = 20  # row and column keys take 20 bits


def _keys32(n: int, seed: int, mult: int, salt: int, device) -> torch.Tensor:
    """Fully mixed keys in [0, 2^20) per row (or column) index, int32."""
    i = torch.arange(n, dtype=torch.int64, device=device)
    h = _fmix32(((i * mult) & _M32) ^ ((seed ^ salt) & _M32))
    return (h >> (32 - _KEY_BITS)).to(torch.int32)


def dropout_threshold(p: float) -> int:
    """Keep an element iff its signed 32-bit hash is >= this: probability 1 - p (to 2^-32)."""
    return min(round(p * 2.0**32), (1 << 32) - 1) - (1 << 31)


def _mix(h: torch.Tensor) -> torch.Tensor:
    """The per-element mixer of key_row + key_col: multiply, xor-shift, multiply, wrapping int32 (in place)."""
    h.mul_(_signed32(_C1))
    h.bitwise_xor_(h >> 15)  # arithmetic shift on int32, as in the kernels
    return h.mul_(_signed32(_C2))


def dropout_mask(seed: int, rows: int, cols: int, p: float, *, device=None) -> torch.Tensor:
    """Keep mask (rows, cols), bool, of dropout probability `p`: a pure function of (seed, row, column).

    Rows and columns get fully mixed 20-bit keys (murmur3's finalizer); element (i, j) keeps iff
    mix(key_i + key_j) >= threshold, `_mix` being multiply / xor-shift / multiply in wrapping int32. The Triton
    kernels compute the same bits in registers (`_keep_tile`), so forward and backward agree, on both paths.
    Two rows share a mask only if their keys collide (probability 2^-20 per pair).
    """
    rk, ck = _keys32(rows, seed, _C1, 0, device), _keys32(cols, seed, _C4, 0x165667B1, device)
    return _mix(rk[:, None] + ck[None, :]) >= dropout_threshold(p)


def cpu_drop_positions(seed: int, x: torch.Tensor, p: float) -> torch.Tensor:
    """The PyTorch path's dropped positions of x (M, K), flat, int64: torch's generator seeded by `seed`
    (`sftfuse.kernels.dropout`), not the Triton path's hash; a pure function of (seed, M K, p)."""
    return drop_positions(seed, x.numel(), p, device=x.device)


def cpu_drop_mask(seed: int, rows: int, cols: int, p: float, *, device=None) -> torch.Tensor:
    """The PyTorch path's drop mask (True = dropped) as a dense bool (rows, cols): the tests' view of it."""
    return drop_mask(drop_positions(seed, rows * cols, p, device=device), rows, cols)


def keep_mask(x: torch.Tensor, seed: int, p: float, rank: int | None = None) -> torch.Tensor | None:
    """The keep mask (M, K) that `lora_linear_fwd` / `_bwd` apply to x (M, K) with this seed, on x's path (the
    tests' oracle): `dropout_mask` on the Triton path, `cpu_drop_mask` on the PyTorch path; None when p == 0."""
    if p <= 0:
        return None
    if _use_triton(x, rank):
        return dropout_mask(seed, x.shape[0], x.shape[1], p, device=x.device)
    return cpu_drop_mask(seed, x.shape[0], x.shape[1], p, device=x.device).logical_not()


def new_seed() -> int:
    """A dropout seed from torch's default generator, so torch.manual_seed reproduces the masks."""
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))


def lora_linear_ref(x, weight, lora_A, lora_B, scaling, *, bias=None, keep=None, p=0.0, upcast=False):
    """y = x W^T + b + s * (dropout(x) A^T) B^T, written for clarity (the oracle of the tests).

    Args:
        x: (M, K). weight: (N, K) dense base (dequantize an NF4 base first). lora_A: (r, K). lora_B: (N, r).
        scaling: s. bias: (N,) or None. keep: bool (M, K) dropout keep mask or None; p: its drop probability.
        upcast: compute in float64.
    Returns:
        y (M, N), differentiable in x, lora_A and lora_B.
    """
    if upcast:
        x, weight, lora_A, lora_B = (t.double() for t in (x, weight, lora_A, lora_B))
        bias = bias.double() if bias is not None else None
    xd = x if keep is None else x * keep.to(x.dtype) / (1.0 - p)
    y = x @ weight.T + scaling * (xd @ lora_A.T) @ lora_B.T
    return y + bias if bias is not None else y


# ---------------------------------------------------------------------------------------------------------------
# PyTorch path


def _dense(base) -> torch.Tensor | None:
    return base if isinstance(base, torch.Tensor) else None


def _gemm_dtype(x, base):
    """Dense base: x's dtype, or fp32 where that GEMM is faster on this CPU. NF4 base: x's dtype; nf4_matmul picks
    its own GEMM dtype around the decoded tile, and fp32 copies of x and of the (M, N) product made here would only
    add transients (measured: 6% of the QLoRA step's peak RSS, at the same speed)."""
    return gemm_dtype(x.dtype, x.device) if _dense(base) is not None else x.dtype


def _dropped(x: torch.Tensor, xc: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
    """dropout(x) unscaled, from xc = x in the GEMM dtype, for one GEMM: xc itself when nothing is dropped, xc
    zeroed in place when it is a contiguous cast copy of x, else a reused contiguous copy (`dropped_copy`): the
    positions index x (M, K) row-major, whatever its strides."""
    if drop is None:
        return xc
    own = xc.data_ptr() != x.data_ptr() and xc.is_contiguous()
    return zero_at(xc, drop) if own else dropped_copy(xc, drop)


def _lora_fwd_torch(x, base, A, B, s, bias, seed, p):
    cd = _gemm_dtype(x, base)
    drop = cpu_drop_positions(seed, x, p) if p > 0 else None
    xc = x.to(cd)
    W = _dense(base)
    if W is None:
        from sftfuse.kernels.nf4 import nf4_matmul_fwd

        y = nf4_matmul_fwd(xc, base, bias)
    else:
        Wc, bc = W.to(cd), None if bias is None else bias.to(cd)  # a transient fp32 copy where cd is fp32
        y = torch.addmm(bc, xc, Wc.T) if bc is not None else xc @ Wc.T
    t = _dropped(x, xc, drop) @ A.to(cd).T  # (M, r); after xc's last use: a cast copy is zeroed in place
    if p > 0:
        t.mul_(1.0 / (1.0 - p))
    y.addmm_(t, B.to(cd).T, alpha=s)  # the rank-r term accumulated into the base product, no (M, N) temporary
    return y.to(x.dtype), t.to(x.dtype)


def _lora_bwd_torch(dy, x, t, base, A, B, s, seed, p, need_dx):
    cd = _gemm_dtype(dy, base)
    drop = cpu_drop_positions(seed, x, p) if p > 0 else None  # the forward's positions, drawn again
    dyc, Ac = dy.to(cd), A.to(cd)
    u = dyc @ B.to(cd)  # (M, r)
    dx = None
    if need_dx:
        W = _dense(base)
        g = u @ Ac  # (M, K): the adapter's share of dx, masked where the forward dropped x
        if drop is not None:
            zero_at(g, drop)
        if W is None:
            from sftfuse.kernels.nf4 import nf4_matmul_bwd

            dx = nf4_matmul_bwd(dyc, base).add_(g, alpha=s / (1.0 - p))
        else:
            dx = g.addmm_(dyc, W.to(cd), beta=s / (1.0 - p))  # dy W accumulated onto it inside the GEMM
        dx = dx.to(dy.dtype)
    xa = _dropped(x, x.to(cd), drop)
    dA = torch.mm(u.T, xa).mul_(s / (1.0 - p)).to(A.dtype)  # (r, K)
    dB = torch.mm(t.to(cd).T, dyc).mul_(s).T.contiguous().to(B.dtype)  # (N, r); t^T dy reads dy in its layout
    return dx, dA, dB


# ---------------------------------------------------------------------------------------------------------------
# Triton path: launchers of the kernels in sftfuse/kernels/lora_triton.py, in sftfuse/kernels/lora_launch.py with
# the launch plan the cost model reads (the PyTorch path never imports Triton)

from sftfuse.kernels.lora_launch import lora_bwd_triton, lora_fwd_triton, plan  # noqa: E402, F401 (plan: roofline's)

# ---------------------------------------------------------------------------------------------------------------
# Launchers: the op's one Triton-or-PyTorch decision, and forward / backward on 2-D tensors (no autograd)

_TRITON_MAX_RANK = 64  # the Triton kernels hold the rank in one R tile


def _use_triton(x: torch.Tensor, rank: int | None = None) -> bool:
    """The Triton path for CUDA tensors (or SFTFUSE_BACKEND=triton: `sftfuse.kernels._registry.use_triton`),
    except for a rank above 64, which takes the PyTorch path (warned once). rank=None asks for the backend only."""
    if not use_triton(x):
        return False
    if rank is not None and rank > _TRITON_MAX_RANK:
        warn_once("lora.rank", f"lora: rank {rank} > {_TRITON_MAX_RANK} takes the PyTorch path (the Triton kernels "
                               f"hold the rank in one tile of at most {_TRITON_MAX_RANK})")
        return False
    return True


def adapter_dtype(x: torch.Tensor, base) -> torch.dtype:
    """The dtype LoRA adapters compute in: x's, or on the PyTorch backend the GEMM dtype it picks for a dense base
    (fp32 on CPUs where fp32 GEMMs are faster), so fp32 adapters are neither rounded to x's dtype nor copied.
    It follows the backend alone: on the Triton backend a rank over 64 runs the PyTorch path on adapters in x's
    dtype (the GEMM dtype is x's there anyway on CUDA)."""
    return x.dtype if _use_triton(x) else _gemm_dtype(x, base)


def lora_linear_fwd(x, base, lora_A, lora_B, scaling, *, bias=None, seed=0, p=0.0):
    """Forward of `lora_linear` on 2-D x, no autograd.

    Args:
        x: (M, K). base: (N, K) tensor or NF4Weight. lora_A: (r, K), lora_B: (N, r), in x's dtype.
        scaling: s. bias: (N,) or None. seed, p: dropout seed and probability (p = 0: no dropout); the mask is
            a pure function of the seed on each path, so the backward, given the same seed, drops the same x.
    Returns:
        (y (M, N), t (M, r)): the output and the saved projection t = dropout(x) A^T.
    """
    if _use_triton(x, lora_A.shape[0]):
        return lora_fwd_triton(x, base, lora_A, lora_B, scaling, bias, seed, p)
    return _lora_fwd_torch(x, base, lora_A, lora_B, scaling, bias, seed, p)


def lora_linear_bwd(dy, x, t, base, lora_A, lora_B, scaling, *, seed=0, p=0.0, need_dx=True):
    """Backward of `lora_linear` on 2-D tensors: (dx (M, K) or None, dA (r, K), dB (N, r)), in x's dtype; seed and
    p as the forward's."""
    if _use_triton(dy, lora_A.shape[0]):
        return lora_bwd_triton(dy, x, t, base, lora_A, lora_B, scaling, seed, p, need_dx)
    return _lora_bwd_torch(dy, x, t, base, lora_A, lora_B, scaling, seed, p, need_dx)


# ---------------------------------------------------------------------------------------------------------------
# `sftfuse verify`: the Triton path against the fp64 reference


def _verify(ctx: CheckContext) -> None:
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


register_check("lora", _verify)
