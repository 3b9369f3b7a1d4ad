"""Where a run computes: the device and process group, the compute dtype, and the peak-memory figure it reports."""

from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 where the device computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32.

    On CPU the answer is `sftfuse.kernels._cpu.cpu_has_bf16` (the one place that reads what the CPU can do).
    'fp16' is refused on every device: fp16 training needs loss scaling (its 5-bit exponent flushes small
    gradients to zero and overflows large ones), which the trainer does not do; bf16 has fp32's range and needs none.

    Raises:
        ValueError: fp16, or a name that is not auto, bf16, fp16 or fp32; names the dtype and the device.
    """
    if name == "fp16":
        raise ValueError(f"dtype=fp16 on {device.type}: fp16 training needs loss scaling, which sftfuse does not do; "
                         "use dtype=bf16 or dtype=fp32 (or dtype=auto)")
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype={name!r}: expected auto, bf16 or fp32")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    from sftfuse.kernels._cpu import cpu_has_bf16

    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def local_device() -> torch.device:
    """This process's device: `cuda:LOCAL_RANK` (torchrun's variable, 0 without it) where CUDA is available."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed() -> tuple[int, int, torch.device]:
    """(world size, rank, device) from torchrun's environment; starts the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, rank, device


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU (max allocated)"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return f"{int(line.split()[1]) / 2**20:.2f} GiB RSS (process high-water mark)"
    except OSError:
        pass
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"
