"""RMSNorm that saves its 16-bit input and one fp32 scale per row, instead of fp32 copies of every activation.

Per row x (H,): r = 1 / sqrt(mean(x^2) + eps), x_hat = x r (fp32), and one of two output rules, both Hugging Face's:
    "weight":      y = w * dtype(x_hat)               (Llama, Mistral, Qwen2, Qwen3: cast, then scale)
    "one_plus":    y = dtype(x_hat * (1 + w))         (Gemma-2: scale in fp32 with 1 + w, then cast)
HF's eager module keeps, per call, the fp32 input and the fp32 (or 16-bit) x_hat for autograd: 6 to 8 bytes per
element for a bf16 model. This op keeps x itself (2 bytes) and r (4 bytes per row) and recomputes x_hat in the
backward:
    g = dL/dx_hat = dy * w   (or dy * (1 + w)),   dx = r * (g - x_hat * mean(g * x_hat)),   dw = sum_rows dy * x_hat
SmolLM2 (30 layers, 2 norms each, 576 wide, 1024 tokens): 141 MB of fp32 activations become 71 MB of bf16 ones.
PyTorch path (CPU): plain ops, fp32 math. Triton path (CUDA, `sftfuse.kernels.rms_norm_triton`): one kernel each
way, the row in registers (the eager module's ~10 elementwise passes become one read of x and one write of y; the
backward reads x, dy and r once and writes dx once, dw reduced from per-program fp32 partial rows). Rows wider than
8192 take the PyTorch path (warned once).
"""

from __future__ import annotations

import torch

from sftfuse.kernels._registry import (
    CheckContext,
    CheckResult,
    interpreter_active,
    max_error,
    register_check,
    tolerance,
    use_triton,
    warn_once,
)

RULES = ("weight", "one_plus")
_TRITON_MAX_H = 8192  # rms_norm_triton.MAX_H: one row in registers


def _use_triton(x: torch.Tensor) -> bool:
    """The Triton path for CUDA tensors (or SFTFUSE_BACKEND=triton), except rows wider than the kernels hold."""
    if not use_triton(x):
        return False
    if x.shape[-1] > _TRITON_MAX_H:
        warn_once("rms_norm.width", f"rms_norm: rows of {x.shape[-1]} > {_TRITON_MAX_H} take the PyTorch path")
        return False
    return True


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, rule: str):
    """y (HF's dtype rule) and r (..., 1) fp32 for x (..., H)."""
    if _use_triton(x):
        return _rms_norm_fwd_triton(x, weight, eps, rule)
    return _rms_norm_fwd_torch(x, weight, eps, rule)


def _rms_norm_fwd_torch(x, weight, eps, rule):
    x32 = x.float()  # x itself when x is fp32: never written in place then
    r = torch.rsqrt(x32.square().mean(-1, keepdim=True).add_(eps))
    x_hat = x32 * r if x.dtype == torch.float32 else x32.mul_(r)
    if rule == "weight":
        return weight * x_hat.to(x.dtype), r
    return x_hat.mul_(weight.float() + 1.0).to(x.dtype), r


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, rule: str,
                 need_dw: bool):
    """(dx in x's dtype, dw in weight's dtype or None)."""
    if _use_triton(x):
        return _rms_norm_bwd_triton(dy, x, r, weight, rule, need_dw)
    return _rms_norm_bwd_torch(dy, x, r, weight, rule, need_dw)


def _rms_norm_bwd_torch(dy, x, r, weight, rule, need_dw):
    x_hat = x.float() * r if x.dtype == torch.float32 else x.float().mul_(r)
    dy32 = dy.float()
    if rule == "weight":
        g = (dy * weight).float()  # autograd's product in the output dtype, as HF's module
        dw = (dy32 * x_hat.to(x.dtype).float()).sum_to_size(weight.shape) if need_dw else None
    else:
        g = dy32 * (weight.float() + 1.0)
        dw = (dy32 * x_hat).sum_to_size(weight.shape) if need_dw else None
    dot = (g * x_hat).mean(-1, keepdim=True)
    dx = g.sub_(x_hat.mul_(dot)).mul_(r)
    return dx.to(x.dtype), None if dw is None else dw.to(weight.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, rule: str, *, upcast: bool = False):
    """HF's modules, written out (fp64 with `upcast`: no casts at all)."""
    if upcast:
        x64, w64 = x.double(), weight.double()
        x_hat = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
        return w64 * x_hat if rule == "weight" else x_hat * (1.0 + w64)
    x32 = x.float()
    x_hat = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if rule == "weight":
        return weight * x_hat.to(x.dtype)
    return (x_hat * (1.0 + weight.float())).type_as(x)


# ---------------------------------------------------------------------------------------------------------------
# Triton path: launchers of sftfuse/kernels/rms_norm_triton.py (imported on first use)


def _rms_norm_fwd_triton(x, weight, eps, rule):
    import triton

    from sftfuse.kernels import rms_norm_triton as kt

    H = x.shape[-1]
    x2 = x.reshape(-1, H).contiguous()
    M = x2.shape[0]
    out_dtype = x.dtype if rule == "one_plus" else torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(M, H, dtype=out_dtype, device=x.device)
    r = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        cfg = kt.config(H)
        warps = cfg.pop("num_warps")
        kt._rms_norm_fwd_kernel[(triton.cdiv(M, cfg["ROWS"]),)](
            x2, weight.contiguous(), y, r, M, H, x2.stride(0), y.stride(0), float(eps), ONE_PLUS=rule == "one_plus",
            INTERP=interpreter_active(), **cfg, num_warps=warps, num_stages=1)
    return y.view(*x.shape[:-1], H), r.view(*x.shape[:-1], 1)


def _rms_norm_bwd_triton(dy, x, r, weight, rule, need_dw):
    import triton

    from sftfuse.kernels import rms_norm_triton as kt

    H = x.shape[-1]
    x2, dy2 = x.reshape(-1, H).contiguous(), dy.reshape(-1, H).contiguous()
    M = x2.shape[0]
    dx = torch.empty(M, H, dtype=x.dtype, device=x.device)
    if M == 0:
        return dx.view(x.shape), torch.zeros_like(weight) if need_dw else None
    cfg = kt.config(H)
    warps = cfg.pop("num_warps")
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    progs = kt.bwd_programs(M, cfg["ROWS"], sms)
    rows = triton.cdiv(triton.cdiv(M, progs), cfg["ROWS"]) * cfg["ROWS"]
    progs = triton.cdiv(M, rows)
    dw = torch.empty(progs, H, dtype=torch.float32, device=x.device) if need_dw else dx  # dx: never written then
    kt._rms_norm_bwd_kernel[(progs,)](
        dy2, x2, weight.contiguous(), r.reshape(-1).contiguous(), dx, dw, M, H, rows, dy2.stride(0), x2.stride(0),
        dx.stride(0), ONE_PLUS=rule == "one_plus", NEED_DW=need_dw, INTERP=interpreter_active(), **cfg,
        num_warps=warps, num_stages=1)
    return dx.view(x.shape), dw.sum(0).to(weight.dtype) if need_dw else None


# ---------------------------------------------------------------------------------------------------------------
# `sftfuse verify`: the Triton path against the fp64 reference, in HF's own error where it is 16-bit


def _verify(ctx: CheckContext) -> None:
    shapes = [(8192, 4096), (4096, 576)] if ctx.large else [(37, 100), (5, 576)]
    for (M, H), dtype, rule in [(s, d, r) for s in shapes for d in ctx.dtypes for r in RULES]:
        x = torch.randn(M, H, device=ctx.device).to(dtype).requires_grad_()
        w = (torch.randn(H, device=ctx.device) * 0.5).to(dtype).requires_grad_()
        dy = torch.randn(M, H, device=ctx.device).to(dtype)
        y, r = rms_norm_fwd(x.detach(), w.detach(), 1e-6, rule)
        dx, dw = rms_norm_bwd(dy, x.detach(), r, w.detach(), rule, True)
        x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        y64 = rms_norm_ref(x64, w64, 1e-6, rule, upcast=True)
        refs = [y64.detach(), *torch.autograd.grad(y64, (x64, w64), dy.double())]
        hf = rms_norm_ref(x, w, 1e-6, rule)
        lows = [hf.detach(), *torch.autograd.grad(hf, (x, w), dy)] if dtype != torch.float32 else [None] * 3
        for name, ours, ref, low in zip(("y", "dx", "dw"), (y, dx, dw), refs, lows, strict=True):
            ctx.results.append(CheckResult(f"rms_norm {name} {rule}", "triton", str(dtype).removeprefix("torch."),
                                           f"{M}x{H}", max_error(ours, ref),
                                           tolerance(ref, dtype, None if low is None else max_error(low, ref))))


register_check("rms_norm", _verify)


def plan(M: int, H: int, *, dtype: torch.dtype = torch.bfloat16, need_dw: bool = True, sms: int = 132) -> dict:
    """The Triton path's launches for M rows of width H (forward + backward), each with its HBM bytes, for
    `sftfuse.kernels.roofline`: {"launches": [{"name", "flops", "bytes"}, ...]} (elementwise: no tensor FLOPs).
    The backward's dw partial rows are one per program (`rms_norm_triton.bwd_programs`, `sms` SMs)."""
    e = torch.empty(0, dtype=dtype).element_size()
    block_h = 1 << max(0, H - 1).bit_length()
    rows = max(1, min(16, 2048 // block_h))  # rms_norm_triton.config's ROWS
    progs = max(1, min(-(-M // rows), 4 * sms))
    launches = [{"name": "rms_norm fwd: x -> y, r", "flops": 0, "bytes": 2 * M * H * e + 4 * M + H * e},
                {"name": "rms_norm bwd: dy, x, r -> dx, dw partials", "flops": 0,
                 "bytes": 3 * M * H * e + 4 * M + H * e + (progs * H * 4 if need_dw else 0)}]
    if need_dw:
        launches.append({"name": "rms_norm dw: partials summed", "flops": 0, "bytes": progs * H * 4 + H * e})
    return {"launches": launches}
