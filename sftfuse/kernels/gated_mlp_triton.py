"""Triton kernels of the gated MLP's elementwise part (math, PyTorch path and launchers: sftfuse/kernels/gated_mlp.py).

- `_gated_fwd_kernel`: h = act(g) * u, act SiLU (SwiGLU) or tanh-GELU (GeGLU): reads g and u, writes h (6 bytes
  per element in bf16), where autograd's ops make three passes and a temporary.
- `_gated_bwd_kernel`: from dh, g, u: du = dh * act(g), dg = (dh * u) * act'(g), in one pass (reads three, writes
  two), where the eager backward makes about eight.
fp32 arithmetic with the eager ops' roundings kept (act(g), the products and the gradient each rounded to the
input dtype, to nearest even: `cast_rne`). Flat offsets are int64: tokens x intermediate passes 2^31 at 75k tokens
into a 28,672-wide MLP.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sftfuse.kernels._common_triton import cast_rne
from sftfuse.kernels._registry import KernelSpec, interpreter_active, register_kernel


@triton.jit
def _tanh(z):
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0  # exact enough in fp32, and the same code in the interpreter


@triton.jit
def _act(g, GELU: tl.constexpr):
    if GELU:
        return 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    else:
        return g * tl.sigmoid(g)


@triton.jit
def _act_grad(g, GELU: tl.constexpr):
    """act'(g), as PyTorch's silu_backward / gelu_backward(approximate='tanh') compute it (sqrt(2 / pi) =
    0.79788..., GELU's cubic coefficient 0.044715)."""
    if GELU:
        t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        return 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        s = tl.sigmoid(g)
        return s * (1.0 + g * (1.0 - s))


@triton.jit
def _gated_fwd_kernel(
    g_ptr, u_ptr, h_ptr,  # pointers (flat, contiguous)
    n,  # size
    GELU: tl.constexpr, INTERP: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dt = h_ptr.dtype.element_ty
    a = cast_rne(_act(g, GELU), dt, INTERP).to(tl.float32)
    tl.store(h_ptr + offs, cast_rne(a * u, dt, INTERP), mask=mask)


@triton.jit
def _gated_bwd_kernel(
    dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr,  # pointers (flat, contiguous)
    n,  # size
    GELU: tl.constexpr, INTERP: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dt = dg_ptr.dtype.element_ty
    a = cast_rne(_act(g, GELU), dt, INTERP).to(tl.float32)
    tl.store(du_ptr + offs, cast_rne(dh * a, dt, INTERP), mask=mask)
    dhu = cast_rne(dh * u, dt, INTERP).to(tl.float32)
    tl.store(dg_ptr + offs, cast_rne(dhu * _act_grad(g, GELU), dt, INTERP), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Block size (launchers: sftfuse/kernels/gated_mlp.py) and the compile check


def block() -> int:
    return 1024 if interpreter_active() else 2048


def _specs() -> list[KernelSpec]:
    specs = []
    for ty in ("bf16", "fp32"):
        for gelu in (False, True):
            const = {"GELU": gelu, "INTERP": False, "BLOCK": 2048}
            fwd = {"g_ptr": f"*{ty}", "u_ptr": f"*{ty}", "h_ptr": f"*{ty}", "n": "i32"}
            specs.append(KernelSpec("gated_fwd", _gated_fwd_kernel, fwd | {k: "constexpr" for k in const}, const,
                                    num_warps=8, num_stages=1, divisible=("g_ptr", "u_ptr", "h_ptr", "n")))
            bwd = {n: f"*{ty}" for n in ("dh_ptr", "g_ptr", "u_ptr", "dg_ptr", "du_ptr")} | {"n": "i32"}
            specs.append(KernelSpec("gated_bwd", _gated_bwd_kernel, bwd | {k: "constexpr" for k in const}, const,
                                    num_warps=8, num_stages=1,
                                    divisible=("dh_ptr", "g_ptr", "u_ptr", "dg_ptr", "du_ptr", "n")))
    return specs


register_kernel("gated_mlp", _specs)
