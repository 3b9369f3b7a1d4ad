"""The optimizer of `sftfuse train`: AdamW with fp32 or 8-bit states, over fp32 master weights, and its schedule.

Master weights. The optimizer never updates the model's own parameters when they are 16-bit: an AdamW update of
about lr * 0.1 (1e-4 for LoRA, 5e-6 for a full fine-tune) vanishes in bf16's 8-bit mantissa next to a weight of
0.02-1. So each trainable parameter gets an fp32 master copy; after backward its gradient is copied (upcast) to
the master, the optimizer steps the masters, and the masters are rounded back into the model. An fp32 parameter is
its own master (no copy: a full fine-tune of a 135M model in fp32 would hold a second 540 MB otherwise).

Optimizer states (`optimizer=`):
- adamw: torch's AdamW, two fp32 states per weight (8 bytes per trained weight).
- adamw8bit: bitsandbytes' AdamW8bit, both states blockwise-quantized to 8 bits with the dynamic code (2 bytes per
  weight plus one fp32 absmax per block of 256); tensors under 4,096 elements (norms, biases) keep fp32 states.
  bitsandbytes 0.50 runs it on CPU tensors too (pure PyTorch there, slower per step than torch's AdamW).
- paged_adamw8bit: the same states in CUDA unified memory, paged out to host RAM under GPU memory pressure; on a
  device without CUDA there is nothing to page to, so adamw8bit runs (and the run says so).
Where the 8-bit optimizer cannot run (bitsandbytes missing, or its step fails on this device: probed on a small
tensor before training), AdamW with fp32 states runs, and the run says so and why.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
BETAS = (0.9, 0.999)


def lr_lambda(cfg, total_steps: int):
    """Linear warmup to 1, then cosine decay to `min_lr_ratio` at `total_steps`."""
    warm = min(cfg.warmup_steps, max(total_steps - 1, 0))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = min((step - warm) / max(total_steps - warm, 1), 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# ================================================================================================ master weights
def make_masters(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 master copies of `params` (a parameter already fp32 is its own master)."""
    return [p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True) for p in params]


@torch.no_grad()
def grads_to_masters(masters: list[torch.Tensor], params: list[torch.Tensor]) -> None:
    """Move each parameter's gradient to its master (upcast); a parameter without one gets zeros."""
    for m, p in zip(masters, params, strict=True):
        if m is p:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            continue
        m.grad = p.grad.float() if p.grad is not None else torch.zeros_like(m)
        p.grad = None


@torch.no_grad()
def masters_to_params(masters: list[torch.Tensor], params: list[torch.Tensor]) -> None:
    for m, p in zip(masters, params, strict=True):
        if m is not p:
            p.copy_(m)


# ===================================================================================================== optimizer
def _probe_8bit(cls, device: torch.device) -> str | None:
    """None when bitsandbytes' 8-bit optimizer `cls` steps a small tensor on `device`, else why not."""
    try:
        p = torch.nn.Parameter(torch.ones(4096, device=device))
        p.grad = torch.full_like(p, 0.5)
        opt = cls([p], lr=1e-3)
        opt.step()
        if opt.state[p]["state1"].dtype != torch.uint8 or not bool(torch.isfinite(p).all()):
            return "its step did not keep 8-bit states"
    except Exception as e:  # noqa: BLE001 - any failure means: not on this device; the message names it
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}"
    return None


def build_optimizer(name: str, params: list[torch.Tensor], *, lr: float, weight_decay: float,
                    device: torch.device) -> tuple[torch.optim.Optimizer, str, str | None]:
    """The optimizer `name` (one of OPTIMIZERS) over `params`, or the nearest one that runs on `device`.

    Returns:
        (optimizer, the name of what runs, a message saying why that is not `name`, or None).

    Raises:
        ValueError: an unknown `name`.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r}: expected one of {', '.join(OPTIMIZERS)}")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=BETAS), "adamw", None
    try:
        import bitsandbytes as bnb
    except ImportError:
        why = f"optimizer={name}: bitsandbytes is not installed; running adamw (fp32 states) instead"
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=BETAS), "adamw", why
    notes = []
    runs = name
    if name == "paged_adamw8bit" and device.type != "cuda":
        notes.append(f"optimizer=paged_adamw8bit: paged optimizer states need CUDA unified memory, and this run is "
                     f"on {device.type}; running adamw8bit (the same 8-bit states, not paged) instead")
        runs = "adamw8bit"
    cls = bnb.optim.PagedAdamW8bit if runs == "paged_adamw8bit" else bnb.optim.AdamW8bit
    why = _probe_8bit(cls, device)
    if why is not None:
        notes.append(f"optimizer={runs}: bitsandbytes {bnb.__version__} cannot run it on {device.type} ({why}); "
                     "running adamw (fp32 states) instead")
        return (torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=BETAS), "adamw",
                "; ".join(notes))
    return cls(params, lr=lr, weight_decay=weight_decay, betas=BETAS), runs, "; ".join(notes) or None


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter states (moments, 8-bit code books and block scales, steps)."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def log_choice(log: Callable[[str], None], requested: str, runs: str, why: str | None) -> None:
    if why:
        log(why)
    elif requested != "adamw":
        log(f"optimizer: {runs} (bitsandbytes, 8-bit states)")
