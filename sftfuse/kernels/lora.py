"""LoRA linear: y = x W^T + b + s * (dropout(x) A^T) B^T over a frozen 16-bit or NF4 base, forward and backward.

x (M, K) tokens x in-features, W (N, K) frozen, A (r, K), B (N, r), s = alpha / r (alpha / sqrt(r), rsLoRA).
Dropout keeps x with probability 1 - p and scales by 1 / (1 - p); its mask is a pure function of (seed, row,
column) (`dropout_mask`, the same bits on both paths), so no dropped-out copy of x is ever stored.

Forward: t = dropout(x) A^T (M, r); y = x W^T + b + s t B^T. Saved: x, t and the seed (PEFT keeps an fp32 copy
of x, the dropped-out copy and its mask: 9 bytes per element of x against our 2, in bf16).
Backward, with u = dy B (M, r):
    dx = dy W + s * mask * (u A) / (1 - p)       dB = s dy^T t       dA = s u^T dropout(x)
The frozen base never gets a gradient. Accumulation is fp32 on both paths.

PyTorch path (CPU): the same plan in plain ops, the low-rank terms folded into the big products with addmm_
(bf16 matmuls when inputs are bf16). Triton path: one kernel per direction computes the base matmul and, in
the same K loop, the rank-r projection of its input tile (an extra R-wide dot, masked in registers for the
forward dropout), then adds s * proj B^T (forward) or s * mask * (proj A) (dx) in the epilogue; the programs
of the first column block store the projection (t or u). Limits: r <= 64 per kernel (R padded to 16..64).
dA and dB are skinny reductions over tokens (`_lora_reduce_kernel`, split over tokens for parallelism).
"""

from __future__ import annotations

import torch

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


def _keys32(n: int, seed: int, mult: int, salt: int, device) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.int64, device=device)
    h = _fmix32(((i * mult) & _M32) ^ ((seed ^ salt) & _M32))
    return (h ^ (1 << 31)) - (1 << 31)  # same bits as int32


def dropout_threshold(p: float) -> int:
    """Keep an element iff its signed 32-bit hash is >= this: probability 1 - p (to 2^-32)."""
    return min(round(p * 2.0**32), (1 << 32) - 1) - (1 << 31)


def _hash32(seed: int, rows: int, cols: int, device) -> torch.Tensor:
    """int32 (rows, cols) hash of (seed, row, col): key_row + key_col, multiply, xor-shift, multiply (wrapping)."""
    rk = _keys32(rows, seed, _C1, 0, device).to(torch.int32)
    ck = _keys32(cols, seed, _C4, 0x165667B1, device).to(torch.int32)
    h = rk[:, None] + ck[None, :]
    h.mul_(_signed32(_C1))
    h.bitwise_xor_(h >> 15)  # arithmetic shift on int32, as in the kernels
    return h.mul_(_signed32(_C2))


def dropout_mask(seed: int, rows: int, cols: int, p: float, *, device=None) -> torch.Tensor:
    """Keep mask (rows, cols), bool, of dropout probability `p`: a pure function of (seed, row, column).

    Per-row and per-column keys are fully mixed once; each element mixes key_row + key_col with multiply /
    xor-shift / multiply in wrapping int32 (five vector ops per element on CPU). The Triton kernels compute the
    same bits in registers (`_keep_tile`), so a forward and its backward agree, on both paths.
    """
    return _hash32(seed, rows, cols, device) >= dropout_threshold(p)


def _drop_mask(seed, rows, cols, p, device):
    return _hash32(seed, rows, cols, device) < dropout_threshold(p)  # the complement, saving a logical-not pass


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


def _lora_fwd_torch(x, base, A, B, s, bias, seed, p):
    drop = _drop_mask(seed, x.shape[0], x.shape[1], p, x.device) if p > 0 else None
    xa = x if drop is None else x.masked_fill(drop, 0)
    t = xa @ A.T  # (M, r)
    if p > 0:
        t.mul_(1.0 / (1.0 - p))
    W = _dense(base)
    if W is None:
        from sftfuse.kernels.nf4 import nf4_matmul_fwd

        y = nf4_matmul_fwd(x, base, bias)
    else:
        y = torch.addmm(bias, x, W.T) if bias is not None else x @ W.T
    y.addmm_(t, B.T, alpha=s)  # the rank-r term accumulated into the base product, no (M, N) temporary
    return y, t


def _lora_bwd_torch(dy, x, t, base, A, B, s, seed, p, need_dx):
    drop = _drop_mask(seed, x.shape[0], x.shape[1], p, x.device) if p > 0 else None
    u = dy @ B  # (M, r)
    dx = None
    if need_dx:
        W = _dense(base)
        if W is None:
            from sftfuse.kernels.nf4 import nf4_matmul_bwd

            dx = nf4_matmul_bwd(dy, base)
        else:
            dx = dy @ W
        if drop is None:
            dx.addmm_(u, A, alpha=s)
        else:
            dx.add_((u @ A).masked_fill_(drop, 0), alpha=s / (1.0 - p))
    xa = x if drop is None else x.masked_fill(drop, 0)
    dA = torch.mm(u.T, xa).mul_(s / (1.0 - p))  # (r, K)
    dB = torch.mm(dy.T, t).mul_(s)  # (N, r)
    return dx, dA, dB


def _lora_fwd_triton(*args):
    raise NotImplementedError("LoRA Triton path: not written yet")


_lora_bwd_triton = _lora_fwd_triton


# ---------------------------------------------------------------------------------------------------------------
# Launchers (dispatching: Triton for CUDA tensors or SFTFUSE_BACKEND=triton, else PyTorch)


def lora_linear_fwd(x, base, lora_A, lora_B, scaling, *, bias=None, seed=0, p=0.0):
    """Forward of `lora_linear` on 2-D x, no autograd.

    Args:
        x: (M, K). base: (N, K) tensor or NF4Weight. lora_A: (r, K), lora_B: (N, r), in x's dtype.
        scaling: s. bias: (N,) or None. seed, p: dropout seed and probability (p = 0: no dropout).
    Returns:
        (y (M, N), t (M, r)): the output and the saved projection t = dropout(x) A^T.
    """
    from sftfuse.kernels._registry import use_triton

    if use_triton(x):
        return _lora_fwd_triton(x, base, lora_A, lora_B, scaling, bias, seed, p)
    return _lora_fwd_torch(x, base, lora_A, lora_B, scaling, bias, seed, p)


def lora_linear_bwd(dy, x, t, base, lora_A, lora_B, scaling, *, seed=0, p=0.0, need_dx=True):
    """Backward of `lora_linear` on 2-D tensors: (dx (M, K) or None, dA (r, K), dB (N, r)), in x's dtype."""
    from sftfuse.kernels._registry import use_triton

    if use_triton(dy):
        return _lora_bwd_triton(dy, x, t, base, lora_A, lora_B, scaling, seed, p, need_dx)
    return _lora_bwd_torch(dy, x, t, base, lora_A, lora_B, scaling, seed, p, need_dx)
