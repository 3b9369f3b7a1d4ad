"""Open a checkpoint that transformers saved from a bitsandbytes 4-bit model (the `*-bnb-4bit` directories users
download) as an sftfuse model, without importing bitsandbytes.

Such a directory holds a `config.json` whose `quantization_config` reads `quant_method: "bitsandbytes"`,
`load_in_4bit: true`, `bnb_4bit_quant_type`, `bnb_4bit_compute_dtype`, `bnb_4bit_use_double_quant` and
`bnb_4bit_quant_storage`, and safetensors in which each quantized linear `m` is stored as `m.weight` (the packed
codes, ((out*in+1)//2, 1) bytes, viewed as the quant_storage dtype), `m.weight.absmax`, `m.weight.quant_map`,
`m.weight.nested_absmax` / `m.weight.nested_quant_map` (double quantization) and
`m.weight.quant_state.bitsandbytes__nf4` (the scalars, as JSON bytes). Those are the keys `NF4Linear` reads.

`load_4bit_checkpoint` builds the model from its config (without the quantization entry and without running the
random initialisation), turns every linear the files hold in NF4 into an `NF4Linear` and loads the rest as usual.
The 16-bit skeleton exists for a moment: peak memory is about the model at its `dtype` (quantized layers are
replaced as they load), not the 4-bit size. FP4 and 8-bit checkpoints are refused with a message.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from sftfuse.modules.quantize import load_nf4_checkpoint

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bnb_4bit_config(path: str | Path) -> dict | None:
    """The `quantization_config` of the transformers checkpoint directory `path` when it is a bitsandbytes 4-bit
    one, else None (no directory, no config.json, or another or no quantization)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        qc = json.loads(cfg_file.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError):
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes":
        return None
    return qc if (qc.get("load_in_4bit") or qc.get("_load_in_4bit")) else None


def is_4bit_checkpoint(path: str | Path) -> bool:
    """True when `path` is a directory saved by transformers from a bitsandbytes 4-bit model."""
    return bnb_4bit_config(path) is not None


def _dtype(value, what: str, default: torch.dtype) -> torch.dtype:
    if value is None:
        return default
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"{what}={value!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def load_4bit_checkpoint(path: str | Path, *, dtype: torch.dtype | None = None,
                         compute_dtype: torch.dtype | None = None):
    """Load a transformers + bitsandbytes 4-bit NF4 checkpoint directory as a `*ForCausalLM` with NF4Linear layers.

    bitsandbytes is not imported; the quantized weights are used byte for byte (no requantization), so outputs
    match bitsandbytes' own at the same compute dtype.

    Args:
        path: the directory (config.json + *.safetensors, sharded or not).
        dtype: dtype of the layers kept in 16/32 bits (embeddings, norms, the head); default: the config's
            `dtype` / `torch_dtype`, else float32.
        compute_dtype: dtype the NF4 matmuls run in; default: the config's `bnb_4bit_compute_dtype`, else float32
            (bitsandbytes' default). A later `model.to(dtype)` moves it along.
    Returns:
        the model, in eval mode, with `config.quantization_config` removed (it now holds sftfuse modules).
    Raises:
        ValueError: `path` is not such a directory, or it holds FP4 / 8-bit weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    qc = bnb_4bit_config(path)
    if qc is None:
        raise ValueError(f"path={str(path)!r}: not a bitsandbytes 4-bit checkpoint (config.json needs a "
                         "quantization_config with quant_method 'bitsandbytes' and load_in_4bit true)")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' own default is fp4
    if quant_type != "nf4":
        raise ValueError(f"{path}: bnb_4bit_quant_type={quant_type!r}; sftfuse reads NF4 checkpoints only")
    config = AutoConfig.from_pretrained(path)
    cfg_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = _dtype(dtype if dtype is not None else cfg_dtype, "dtype", torch.float32)
    compute_dtype = _dtype(compute_dtype if compute_dtype is not None else qc.get("bnb_4bit_compute_dtype"),
                           "compute_dtype", torch.float32)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else transformers would look for bitsandbytes
    with _no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    load_nf4_checkpoint(model, path, compute_dtype=compute_dtype, strict=True)
    return model.eval()


def _no_init():
    """transformers' switch that skips the random initialisation the checkpoint overwrites (5.x), if present."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()
