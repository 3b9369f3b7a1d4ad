"""Gated MLP with LoRA on all three projections, the activation's inputs recomputed in the backward.

y = down(act(gate(x)) * up(x)), each projection a LoRA linear (`sftfuse.kernels.lora`) over a 16-bit or NF4
frozen base; act is SiLU (SwiGLU: Llama, Mistral, Qwen2, Qwen3) or tanh-GELU (GeGLU: Gemma-2).

Memory: autograd on the unfused block keeps four (tokens x intermediate) tensors per layer: gate's output (for the
activation's backward), up's output and the activation's output (for the product's backward) and the product
(for down's adapter gradient). At SmolLM2's 1536-wide MLP and 1024 tokens that is 12.6 MB per layer in bf16,
377 MB over 30 layers. This block keeps x (shared with whatever else saved it) and the three rank-r projections t
(tokens x r) and, in the backward, runs gate and up forward once more (two of the block's six large GEMMs, plus
their adapters) to get the activation's inputs back: the trade Unsloth's fused MLP makes.
Backward, with a = act(g), h = a * u (in x's dtype, as autograd runs the unfused block):
    dh, d(down adapter) = lora backward of down at (dy, h);  du = dh * a;  dg = dh * u * act'(g)
    dx = (lora backward of gate at dg) + (lora backward of up at du)
The dropout masks are regenerated from each projection's seed (`sftfuse.kernels.lora`), so the recomputed
forward sees the same masks as the first one. The big GEMMs go through the LoRA launchers. The elementwise part
(h = act(g) u forward; du, dg backward) is one Triton pass each way on CUDA (`gated_mlp_triton`), the eager ops on
CPU (`gated_fwd`, `gated_bwd`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sftfuse.kernels._registry import (
    CheckContext,
    CheckResult,
    interpreter_active,
    max_error,
    register_check,
    tolerance,
    use_triton,
)

ACTS = ("silu", "gelu_tanh")


def act_fwd(g: torch.Tensor, act: str) -> torch.Tensor:
    return F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")


def act_bwd(grad: torch.Tensor, g: torch.Tensor, act: str) -> torch.Tensor:
    """grad * act'(g)."""
    if act == "silu":
        return torch.ops.aten.silu_backward(grad, g)
    return torch.ops.aten.gelu_backward(grad, g, approximate="tanh")



def gated_fwd(g: torch.Tensor, u: torch.Tensor, act: str, *, keep_act: bool = False):
    """h = act(g) * u in g's dtype, g and u (M, F) contiguous: one Triton pass on CUDA, the eager ops on CPU.
    keep_act: return (h, a) with a = act(g) for `gated_bwd` on the PyTorch path (None on the Triton path, which
    recomputes it in registers)."""
    if use_triton(g):
        h = _gated_triton(act, g, u)[0]
        return (h, None) if keep_act else h
    a = act_fwd(g, act)
    if not keep_act:
        return a.mul_(u)
    return a * u, a


def gated_bwd(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act: str, a: torch.Tensor | None = None):
    """(dg, du) of h = act(g) * u: du = dh * act(g), dg = (dh * u) * act'(g); one Triton pass on CUDA. On the
    PyTorch path `a` is act(g) if the caller kept it, and dh is overwritten (a temporary of the block's backward)."""
    if use_triton(g):
        return _gated_triton(act, dh, g, u)
    du = dh * (act_fwd(g, act) if a is None else a)
    return act_bwd(dh.mul_(u), g, act), du


def _gated_triton(act, *ins):
    """The forward kernel on (g, u) -> (h,), or the backward kernel on (dh, g, u) -> (dg, du)."""
    import triton

    from sftfuse.kernels import gated_mlp_triton as kt

    ins = [t.contiguous() for t in ins]
    outs = tuple(torch.empty_like(ins[-1]) for _ in range(len(ins) - 1))
    n = ins[0].numel()
    if n:
        kernel = kt._gated_fwd_kernel if len(ins) == 2 else kt._gated_bwd_kernel
        kernel[(triton.cdiv(n, kt.block()),)](*ins, *outs, n, GELU=act == "gelu_tanh", INTERP=interpreter_active(),
                                              BLOCK=kt.block(), num_warps=8)
    return outs


# ---------------------------------------------------------------------------------------------------------------
# `sftfuse verify`: the Triton path against the fp64 reference, in PyTorch's own error where it is 16-bit


def _verify(ctx: CheckContext) -> None:
    shapes = [(8192, 14336), (1024, 1536)] if ctx.large else [(37, 101)]
    for (M, F_), dtype, act in [(s, d, a) for s in shapes for d in ctx.dtypes for a in ACTS]:
        g, u, dh = (torch.randn(M, F_, device=ctx.device).mul_(2).to(dtype) for _ in range(3))
        h = gated_fwd(g, u, act)
        dg, du = gated_bwd(dh, g, u, act)
        g64, u64 = g.double().requires_grad_(), u.double().requires_grad_()
        h64 = act_fwd(g64, act) * u64
        refs = [h64.detach(), *torch.autograd.grad(h64, (g64, u64), dh.double())]
        if dtype != torch.float32:
            gl, ul = g.clone().requires_grad_(), u.clone().requires_grad_()
            hl = act_fwd(gl, act) * ul
            lows = [hl.detach(), *torch.autograd.grad(hl, (gl, ul), dh)]
        else:
            lows = [None] * 3
        for name, ours, ref, low in zip(("h", "dg", "du"), (h, dg, du), refs, lows, strict=True):
            ctx.results.append(CheckResult(f"gated_mlp {name} {act}", "triton", str(dtype).removeprefix("torch."),
                                           f"{M}x{F_}", max_error(ours, ref),
                                           tolerance(ref, dtype, None if low is None else max_error(low, ref))))


register_check("gated_mlp", _verify)


def plan(M: int, F_: int, *, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The Triton path's elementwise launches of one gated MLP step (M tokens, F_ intermediate), with their HBM
    bytes, for `sftfuse.kernels.roofline`: the forward's h, the backward's h again (down's adapter gradient needs it;
    the block saves no (M, F) tensor) and the fused dg, du pass."""
    e = torch.empty(0, dtype=dtype).element_size()
    return {"launches": [{"name": "gated fwd: h = act(g) u", "flops": 0, "bytes": 3 * M * F_ * e},
                         {"name": "gated fwd again in the backward: h", "flops": 0, "bytes": 3 * M * F_ * e},
                         {"name": "gated bwd: dg, du from dh, g, u", "flops": 0, "bytes": 5 * M * F_ * e}]}
