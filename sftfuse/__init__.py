"""sftfuse: fused kernels and an SFT engine for Hugging Face causal language models.

The public API is loaded lazily, so `import sftfuse` imports neither Triton nor transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "load_default_model": "sftfuse.engine.models",
    "tiny_model": "sftfuse.engine.models",
}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'sftfuse' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
