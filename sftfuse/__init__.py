"""sftfuse: fused kernels and an SFT engine for Hugging Face causal language models.

The public API is loaded lazily, so `import sftfuse` imports neither Triton nor transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "linear_cross_entropy": "sftfuse.ops.cross_entropy",
    "nf4_matmul": "sftfuse.ops.nf4",
    "lora_linear": "sftfuse.ops.lora",
    "NF4Weight": "sftfuse.kernels.nf4",
    "quantize_nf4": "sftfuse.kernels.nf4",
    "dequantize_nf4": "sftfuse.kernels.nf4",
    "quantize_model": "sftfuse.modules.quantize",
    "NF4Linear": "sftfuse.modules.linear",
    "load_4bit_checkpoint": "sftfuse.modules.bnb_checkpoint",
    "LoRALinear": "sftfuse.modules.linear",
    "patch_model": "sftfuse.patch.patcher",
    "unpatch_model": "sftfuse.patch.patcher",
    "loss_only": "sftfuse.patch.patcher",
    "PatchReport": "sftfuse.patch.patcher",
    "load_default_model": "sftfuse.train.models",
    "tiny_model": "sftfuse.train.models",
}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'sftfuse' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
