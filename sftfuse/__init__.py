"""sftfuse: fused kernels and an SFT engine for Hugging Face causal language models.

The public API is loaded lazily, so `import sftfuse` imports neither Triton nor transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "linear_cross_entropy": "sftfuse.engine.functions",
    "nf4_matmul": "sftfuse.engine.functions",
    "lora_linear": "sftfuse.engine.functions",
    "NF4Weight": "sftfuse.kernels.nf4",
    "quantize_nf4": "sftfuse.kernels.nf4",
    "dequantize_nf4": "sftfuse.kernels.nf4",
    "quantize_model": "sftfuse.engine.quantize",
    "NF4Linear": "sftfuse.engine.modules",
    "LoRALinear": "sftfuse.engine.modules",
    "patch_model": "sftfuse.engine.patcher",
    "unpatch_model": "sftfuse.engine.patcher",
    "PatchReport": "sftfuse.engine.patcher",
    "load_default_model": "sftfuse.engine.models",
    "tiny_model": "sftfuse.engine.models",
}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'sftfuse' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
