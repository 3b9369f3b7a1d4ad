"""RMSNorm that saves its 16-bit input and one fp32 scale per row, instead of fp32 copies of every activation.

Per row x (H,): r = 1 / sqrt(mean(x^2) + eps), x_hat = x r (fp32), and one of two output rules, both Hugging Face's:
    "weight":      y = w * dtype(x_hat)               (Llama, Mistral, Qwen2, Qwen3: cast, then scale)
    "one_plus":    y = dtype(x_hat * (1 + w))         (Gemma-2: scale in fp32 with 1 + w, then cast)
HF's eager module keeps, per call, the fp32 input and the fp32 (or 16-bit) x_hat for autograd: 6 to 8 bytes per
element for a bf16 model. This op keeps x itself (2 bytes) and r (4 bytes per row) and recomputes x_hat in the
backward:
    g = dL/dx_hat = dy * w   (or dy * (1 + w)),   dx = r * (g - x_hat * mean(g * x_hat)),   dw = sum_rows dy * x_hat
SmolLM2 (30 layers, 2 norms each, 576 wide, 1024 tokens): 141 MB of fp32 activations become 71 MB of bf16 ones.
Plain PyTorch ops, fp32 math: the same code runs on CPU and CUDA (the two elementwise passes are bandwidth-bound
and the saving is in memory, so there is no Triton kernel for it).
"""

from __future__ import annotations

import torch

RULES = ("weight", "one_plus")


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, rule: str):
    """y (HF's dtype rule) and r (..., 1) fp32 for x (..., H)."""
    x32 = x.float()  # x itself when x is fp32: never written in place then
    r = torch.rsqrt(x32.square().mean(-1, keepdim=True).add_(eps))
    x_hat = x32 * r if x.dtype == torch.float32 else x32.mul_(r)
    if rule == "weight":
        return weight * x_hat.to(x.dtype), r
    return x_hat.mul_(weight.float() + 1.0).to(x.dtype), r


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, rule: str,
                 need_dw: bool):
    """(dx in x's dtype, dw in weight's dtype or None)."""
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
