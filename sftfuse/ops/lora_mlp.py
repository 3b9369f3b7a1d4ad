"""Gated LoRA MLP: the autograd Function and `lora_mlp` (kernels: sftfuse/kernels/gated_mlp.py, lora.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from sftfuse.kernels.gated_mlp import ACTS, gated_bwd, gated_fwd
from sftfuse.kernels.lora import adapter_dtype, lora_linear_bwd, lora_linear_fwd, new_seed
from sftfuse.ops._common import without_autocast


@dataclass(frozen=True)
class LoRAParts:
    """One LoRA projection of a fused block: frozen `base` (tensor or NF4Weight), scaling, dropout p and seed."""

    base: object
    scaling: float
    p: float
    seed: int


@dataclass(frozen=True)
class _MLPOptions:
    """The Function's non-tensor arguments: the three projections, the activation ("silu" or "gelu_tanh") and
    whether the backward runs gate and up forward again (recompute) or reads their saved outputs."""

    gate: LoRAParts
    up: LoRAParts
    down: LoRAParts
    act: str
    recompute: bool


class _MLPSaved(NamedTuple):
    """What the block keeps for the backward (through save_for_backward): x, the rank-r projections, gate's and up's
    outputs only when not recomputing, and the adapters themselves (not their casts)."""

    x2: torch.Tensor  # (M, H)
    t_gate: torch.Tensor  # (M, r) dropout(x) A_gate^T
    t_up: torch.Tensor  # (M, r)
    t_down: torch.Tensor  # (M, r)
    g: torch.Tensor | None  # (M, F) gate's output; None when recomputing
    u: torch.Tensor | None  # (M, F) up's output; None when recomputing
    gate_A: torch.Tensor
    gate_B: torch.Tensor
    up_A: torch.Tensor
    up_B: torch.Tensor
    down_A: torch.Tensor
    down_B: torch.Tensor

    @property
    def adapters(self) -> tuple[torch.Tensor, ...]:
        return self.gate_A, self.gate_B, self.up_A, self.up_B, self.down_A, self.down_B


class _LoRAMLPFunction(torch.autograd.Function):
    """down(act(gate(x)) * up(x)) over three LoRA linears; saves x and the rank-r projections only.

    apply(x, opts, gate_A, gate_B, up_A, up_B, down_A, down_B): the six adapters (the tensors that get gradients)
    are variadic, the rest is one `_MLPOptions`."""

    @staticmethod
    @without_autocast
    def forward(ctx, x, opts: _MLPOptions, *adapters):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        pg, pu, pd = opts.gate, opts.up, opts.down
        cd = adapter_dtype(x2, pg.base)  # x's dtype, or the GEMM's (as in LoRALinearFunction)
        ab = [w.to(cd) for w in adapters]
        g, tg = lora_linear_fwd(x2, pg.base, ab[0], ab[1], pg.scaling, seed=pg.seed, p=pg.p)
        u, tu = lora_linear_fwd(x2, pu.base, ab[2], ab[3], pu.scaling, seed=pu.seed, p=pu.p)
        h = gated_fwd(g, u, opts.act)  # in x's dtype, as the unfused block (SiLU/GELU compute in fp32 inside)
        y, td = lora_linear_fwd(h, pd.base, ab[4], ab[5], pd.scaling, seed=pd.seed, p=pd.p)
        kept = (None, None) if opts.recompute else (g, u)
        ctx.save_for_backward(*_MLPSaved(x2, tg, tu, td, *kept, *adapters))  # adapters, not casts
        ctx.opts, ctx.cd, ctx.x_shape = opts, cd, x.shape
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @without_autocast
    def backward(ctx, dy):
        saved, opts = _MLPSaved(*ctx.saved_tensors), ctx.opts
        ab = [w.to(ctx.cd) for w in saved.adapters]
        pg, pu, pd = opts.gate, opts.up, opts.down
        x2, g, u = saved.x2, saved.g, saved.u
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype).contiguous()
        if g is None:  # recompute: gate and up run forward again (the same dropout masks: they follow the seeds)
            g, _ = lora_linear_fwd(x2, pg.base, ab[0], ab[1], pg.scaling, seed=pg.seed, p=pg.p)
            u, _ = lora_linear_fwd(x2, pu.base, ab[2], ab[3], pu.scaling, seed=pu.seed, p=pu.p)
        # the elementwise part in x's dtype, as autograd would run the unfused block (no fp32 copies: at 1536
        # wide they were 5 x 6 MB of transients per layer)
        h, a = gated_fwd(g, u, opts.act, keep_act=True)  # a = act(g) on the PyTorch path, None on the Triton path
        dh, dA_d, dB_d = lora_linear_bwd(dy2, h, saved.t_down, pd.base, ab[4], ab[5], pd.scaling, seed=pd.seed,
                                         p=pd.p)
        del h
        dg, du = gated_bwd(dh, g, u, opts.act, a)
        del a, g, u, dh
        need_dx = ctx.needs_input_grad[0]
        dxg, dA_g, dB_g = lora_linear_bwd(dg, x2, saved.t_gate, pg.base, ab[0], ab[1], pg.scaling, seed=pg.seed,
                                          p=pg.p, need_dx=need_dx)
        dxu, dA_u, dB_u = lora_linear_bwd(du, x2, saved.t_up, pu.base, ab[2], ab[3], pu.scaling, seed=pu.seed,
                                          p=pu.p, need_dx=need_dx)
        dx = dxg.add_(dxu).reshape(ctx.x_shape) if need_dx else None
        grads = [t.to(w.dtype) for t, w in zip((dA_g, dB_g, dA_u, dB_u, dA_d, dB_d), saved.adapters, strict=True)]
        return dx, None, *grads


def lora_mlp(x, gate, up, down, *, act="silu", training=True, recompute=True):
    """Gated MLP down(act(gate(x)) * up(x)) with a LoRA adapter on each projection, saving only x and the rank-r
    projections (gate and up run forward again in the backward), or, with recompute=False, also gate's and up's
    outputs (half of what autograd keeps for the unfused block, and no GEMM is repeated).

    Args:
        x: (..., hidden). gate, up, down: (base, lora_A, lora_B, scaling, dropout) each, as `lora_linear` takes
            them: base an (out, in) tensor or an NF4Weight, no bias; dropout the adapter's input dropout p.
        act: "silu" (SwiGLU) or "gelu_tanh" (GeGLU). training: dropout applies only when True.
        recompute: True: save x only and run gate and up again in the backward; False: save their outputs too.
    Returns:
        (..., hidden) in x's dtype; gradients to x and the six adapter matrices (in their own dtypes).
    """
    if act not in ACTS:
        raise ValueError(f"act: expected one of {ACTS}, got {act!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {type(x).__name__}")
    parts, adapters = [], []
    for name, (base, A, B, scaling, dropout) in (("gate", gate), ("up", up), ("down", down)):
        out_f, in_f = tuple(base.shape)
        if A.dim() != 2 or A.shape[1] != in_f or tuple(B.shape) != (out_f, A.shape[0]):
            raise ValueError(f"{name}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit base "
                             f"({out_f}, {in_f})")
        if isinstance(base, torch.Tensor) and base.dtype != x.dtype:
            raise TypeError(f"{name}: base dtype {base.dtype} differs from x's {x.dtype}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
        p = float(dropout) if training else 0.0
        parts.append(LoRAParts(base, float(scaling), p, new_seed() if p > 0 else 0))
        adapters += [A, B]
    if x.shape[-1] != gate[0].shape[1] or gate[0].shape[0] != up[0].shape[0] or down[0].shape[1] != up[0].shape[0]:
        raise ValueError(f"x (..., {x.shape[-1]}), gate {tuple(gate[0].shape)}, up {tuple(up[0].shape)} and down "
                         f"{tuple(down[0].shape)} do not chain")
    opts = _MLPOptions(*parts, act=act, recompute=bool(recompute))
    return _LoRAMLPFunction.apply(x, opts, *adapters)
