"""Autograd Functions of the blocks `patch_model` fuses around the kernel ops: the gated LoRA MLP, the RMSNorm and
CPU attention in fp32. Each dispatches its inner ops as `sftfuse.engine.functions` does (Triton on CUDA, the
PyTorch paths on CPU); the kernel ops themselves (linear + cross-entropy, NF4 matmul, LoRA linear) live there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sftfuse.engine.functions import _adapter_dtype, _without_autocast

# =============================================================================================================
# Gated LoRA MLP (sftfuse/kernels/gated_mlp.py) and RMSNorm (sftfuse/kernels/rms_norm.py)
# =============================================================================================================


@dataclass(frozen=True)
class LoRAParts:
    """One LoRA projection of a fused block: frozen `base` (tensor or NF4Weight), scaling, dropout p and seed."""

    base: object
    scaling: float
    p: float
    seed: int


class _LoRAMLPFunction(torch.autograd.Function):
    """down(act(gate(x)) * up(x)) over three LoRA linears; saves x and the rank-r projections only."""

    @staticmethod
    @_without_autocast
    def forward(ctx, x, gate_A, gate_B, up_A, up_B, down_A, down_B, parts, act, recompute):
        from sftfuse.kernels.gated_mlp import act_fwd
        from sftfuse.kernels.lora import lora_linear_fwd

        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        pg, pu, pd = parts
        cd = _adapter_dtype(x2, pg.base)  # x's dtype, or the GEMM's (as in LoRALinearFunction)
        ab = [w.to(cd) for w in (gate_A, gate_B, up_A, up_B, down_A, down_B)]
        g, tg = lora_linear_fwd(x2, pg.base, ab[0], ab[1], pg.scaling, seed=pg.seed, p=pg.p)
        u, tu = lora_linear_fwd(x2, pu.base, ab[2], ab[3], pu.scaling, seed=pu.seed, p=pu.p)
        h = act_fwd(g, act).mul_(u)  # in x's dtype, as the unfused block (SiLU/GELU compute in fp32 inside)
        y, td = lora_linear_fwd(h, pd.base, ab[4], ab[5], pd.scaling, seed=pd.seed, p=pd.p)
        kept = (None, None) if recompute else (g, u)
        ctx.save_for_backward(x2, tg, tu, td, *kept, gate_A, gate_B, up_A, up_B, down_A, down_B)  # not the casts
        ctx.cd = cd
        ctx.parts, ctx.act, ctx.x_shape = parts, act, x.shape
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @_without_autocast
    def backward(ctx, dy):
        from sftfuse.kernels.gated_mlp import act_bwd, act_fwd
        from sftfuse.kernels.lora import lora_linear_bwd, lora_linear_fwd

        x2, tg, tu, td, g, u, *adapters = ctx.saved_tensors
        ab = [w.to(ctx.cd) for w in adapters]
        pg, pu, pd = ctx.parts
        dt = x2.dtype
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dt).contiguous()
        if g is None:  # recompute: gate and up run forward again (same dropout masks, from the same seeds)
            g, _ = lora_linear_fwd(x2, pg.base, ab[0], ab[1], pg.scaling, seed=pg.seed, p=pg.p)
            u, _ = lora_linear_fwd(x2, pu.base, ab[2], ab[3], pu.scaling, seed=pu.seed, p=pu.p)
        # the elementwise part in x's dtype, as autograd would run the unfused block (no fp32 copies: at 1536
        # wide they were 5 x 6 MB of transients per layer)
        a = act_fwd(g, ctx.act)
        h = a * u
        dh, dA_d, dB_d = lora_linear_bwd(dy2, h, td, pd.base, ab[4], ab[5], pd.scaling, seed=pd.seed, p=pd.p)
        del h
        du = dh * a
        del a
        dg = act_bwd(dh.mul_(u), g, ctx.act)
        del g, u, dh
        need_dx = ctx.needs_input_grad[0]
        dxg, dA_g, dB_g = lora_linear_bwd(dg, x2, tg, pg.base, ab[0], ab[1], pg.scaling, seed=pg.seed, p=pg.p,
                                          need_dx=need_dx)
        dxu, dA_u, dB_u = lora_linear_bwd(du, x2, tu, pu.base, ab[2], ab[3], pu.scaling, seed=pu.seed, p=pu.p,
                                          need_dx=need_dx)
        dx = dxg.add_(dxu).reshape(ctx.x_shape) if need_dx else None
        grads = [t.to(w.dtype) for t, w in zip((dA_g, dB_g, dA_u, dB_u, dA_d, dB_d), adapters, strict=True)]
        return dx, *grads, None, None, None


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
    from sftfuse.kernels.gated_mlp import ACTS
    from sftfuse.kernels.lora import new_seed

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
    return _LoRAMLPFunction.apply(x, *adapters, tuple(parts), act, bool(recompute))


class _RMSNormFunction(torch.autograd.Function):
    """HF's RMSNorm (rule "weight" or "one_plus"); saves x and one fp32 scale per row."""

    @staticmethod
    @_without_autocast
    def forward(ctx, x, weight, eps, rule):
        from sftfuse.kernels.rms_norm import rms_norm_fwd

        y, r = rms_norm_fwd(x, weight, eps, rule)
        ctx.save_for_backward(x, r, weight)
        ctx.rule = rule
        return y

    @staticmethod
    @_without_autocast
    def backward(ctx, dy):
        from sftfuse.kernels.rms_norm import rms_norm_bwd

        x, r, weight = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy, x, r, weight, ctx.rule, ctx.needs_input_grad[1])
        return dx, dw, None, None


def rms_norm(x, weight, eps, rule="weight"):
    """RMSNorm over the last dim, Hugging Face's numerics: rule "weight" is Llama's w * dtype(x_hat), "one_plus"
    Gemma-2's dtype(x_hat * (1 + w)). Saves only x and one fp32 scale per row for the backward."""
    from sftfuse.kernels.rms_norm import RULES

    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight: expected shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    return _RMSNormFunction.apply(x, weight, float(eps), rule)


# =============================================================================================================
# attention: torch's scaled_dot_product_attention, 16-bit CPU inputs computed in fp32
# =============================================================================================================


class _WideAttentionFunction(torch.autograd.Function):
    """sdpa on fp32 copies of 16-bit q, k, v through torch's CPU flash-attention kernel; saves the 16-bit inputs,
    the fp32 output and the log-sum-exp, and runs that kernel's backward on fp32 copies made again."""

    @staticmethod
    @_without_autocast
    def forward(ctx, query, key, value, attn_mask, opts: dict):
        wide = [t.float() for t in (query, key, value)]  # transient: recast in the backward
        out, lse = _flash_fwd(*wide, attn_mask=attn_mask, is_causal=opts["is_causal"], scale=opts["scale"])
        ctx.save_for_backward(query, key, value, attn_mask, out, lse)
        ctx.opts = opts
        return out.to(query.dtype)

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_out):
        query, key, value, attn_mask, out, lse = ctx.saved_tensors
        grads = _flash_bwd(grad_out.float(), *(t.float() for t in (query, key, value)), out, lse, 0.0,
                           ctx.opts["is_causal"], attn_mask=attn_mask, scale=ctx.opts["scale"])
        dq, dk, dv = (g.to(t.dtype) if need else None
                      for g, t, need in zip(grads, (query, key, value), ctx.needs_input_grad[:3], strict=True))
        return dq, dk, dv, None, None


# torch's CPU flash-attention kernel and its backward (private aten ops, in torch since 2.2; torch's own function
# is used where a build lacks them)
_HAS_FLASH_CPU = all(hasattr(torch.ops.aten, op) for op in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"))


def _flash_fwd(query, key, value, *, attn_mask, is_causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal,
                                                                      attn_mask=attn_mask, scale=scale)


def _flash_bwd(*args, **kwargs):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(*args, **kwargs)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """`torch.nn.functional.scaled_dot_product_attention`, same arguments and result, computed in fp32 for 16-bit
    CPU inputs where fp32 GEMMs are the faster ones here (`sftfuse.kernels._cpu.gemm_dtype`).

    On such a CPU, torch's flash attention in bf16 runs its matmuls at bf16's rate: measured on this project's
    2-core Xeon (B=4, 9 heads, 256 tokens, head_dim 64, causal), forward + backward took 23 ms in bf16 and 10-12 ms
    this way. The fp32 copies of q, k and v are transient: the backward keeps the 16-bit inputs, the fp32 output
    and the log-sum-exp (torch's bf16 kernel keeps a bf16 output instead) and hands fresh fp32 copies to the same
    kernel's backward. Running the forward again instead, to keep the output out of memory (2.4 MB a layer at that
    shape), cost 13-15 ms. The output is the fp32 result rounded once to q's dtype; a bool mask becomes the
    additive fp32 bias torch's function makes of it. Anything else (CUDA, fp32 inputs, a CPU with fast bf16 GEMMs,
    dropout, a mask that needs a gradient, mixed dtypes or head sizes, key/value heads that differ from the
    query's without enable_gqa) runs torch's function unchanged.
    """
    from sftfuse.kernels._cpu import gemm_dtype

    opts = dict(dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    dtype = query.dtype
    mask_ok = attn_mask is None or (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()) and not (
        attn_mask.requires_grad and torch.is_grad_enabled())
    shapes_ok = query.dim() == 4 and key.shape == value.shape and query.shape[-1] == key.shape[-1] and (
        enable_gqa or query.shape[1] == key.shape[1]) and _HAS_FLASH_CPU
    if (gemm_dtype(dtype, query.device) == dtype or dropout_p > 0 or not mask_ok or not shapes_ok
            or key.dtype != dtype or value.dtype != dtype):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, **opts)
    if attn_mask is not None:  # an additive fp32 bias, as torch's function hands a bool mask to this kernel
        attn_mask = attn_mask.detach().float() if attn_mask.is_floating_point() else torch.zeros(
            attn_mask.shape, device=attn_mask.device).masked_fill_(attn_mask.logical_not(), float("-inf"))
    return _WideAttentionFunction.apply(query, key, value, attn_mask, opts)
