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
forward sees the same masks as the first one. The big GEMMs go through the LoRA launchers, Triton on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTS = ("silu", "gelu_tanh")


def act_fwd(g: torch.Tensor, act: str) -> torch.Tensor:
    return F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")


def act_bwd(grad: torch.Tensor, g: torch.Tensor, act: str) -> torch.Tensor:
    """grad * act'(g)."""
    if act == "silu":
        return torch.ops.aten.silu_backward(grad, g)
    return torch.ops.aten.gelu_backward(grad, g, approximate="tanh")

