"""Quantize a model's linear layers to NF4 in place, and load or read bitsandbytes 4-bit weights without it.

- `quantize_model` swaps every `nn.Linear` (except those named in `skip` and those tied to an embedding) for an
  `NF4Linear`, one layer at a time, releasing each 16-bit weight as soon as its NF4 copy exists: the peak is the
  model plus one layer's temporaries (the quantizer itself works in 2^20-value chunks).
- `load_nf4_checkpoint` / `load_nf4_state_dict` read a safetensors checkpoint saved by transformers +
  bitsandbytes in 4-bit (keys `m.weight`, `m.weight.absmax`, `m.weight.quant_map`, `m.weight.nested_absmax`,
  `m.weight.nested_quant_map`, `m.weight.quant_state.bitsandbytes__nf4`) into a model built from its config:
  each listed linear becomes an `NF4Linear`, the rest loads as usual. bitsandbytes is not imported.
- `nf4_weight_from_bnb` views a bitsandbytes `Linear4bit`/`Params4bit` quant state as an `NF4Weight`, sharing
  its tensors (no copy of the weight), and `nf4_linear_from_bnb` wraps a whole Linear4bit: the patcher uses them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sftfuse.kernels.nf4 import NF4Weight
from sftfuse.kernels.nf4_launch import check_weight
from sftfuse.modules.linear import NF4Linear, nf4_from_state_dict

_QS = ".weight.quant_state.bitsandbytes__nf4"


def _skipped(name: str, skip) -> bool:
    return any(name == s or name.endswith("." + s) or name.split(".")[-1] == s for s in skip)


def quantize_model(model: nn.Module, skip=("lm_head",), blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every nn.Linear of `model` by an NF4Linear, in place, and return `model`.

    Args:
        skip: module names (full or last component) left in 16-bit; linears whose weight is shared with an
            embedding (tied heads) are always left.
        blocksize, double_quant: the NF4 format (bitsandbytes' defaults: 64, True).
        compute_dtype: dtype of the matmuls (and of the kept biases).
    """
    tied = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not _skipped(n, skip)
             and m.weight.data_ptr() not in tied]
    for name in names:
        linear = model.get_submodule(name)
        model.set_submodule(name, NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant,
                                                        compute_dtype=compute_dtype))
        # release the 16-bit storage now, even if something else still holds the old module
        linear.weight.data = torch.empty(0, dtype=linear.weight.dtype, device=linear.weight.device)
        if linear.bias is not None:
            linear.bias.data = torch.empty(0, dtype=linear.bias.dtype, device=linear.bias.device)
    return model


def load_nf4_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], *,
                        compute_dtype: torch.dtype = torch.bfloat16, strict: bool = True):
    """Load a bitsandbytes 4-bit state dict into `model`, turning each quantized nn.Linear into an NF4Linear.

    Returns the `load_state_dict` result (missing and unexpected keys) for the whole model.
    """
    quantized = [k[: -len(_QS)] for k in state_dict if k.endswith(_QS)]
    for name in quantized:
        module = model.get_submodule(name)
        if isinstance(module, NF4Linear):
            continue  # loads through its own _load_from_state_dict
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name}: the checkpoint holds NF4 weights for a {type(module).__name__}, not nn.Linear")
        q = nf4_from_state_dict(state_dict, name + ".weight", device=module.weight.device)
        if q.shape != tuple(module.weight.shape):
            raise ValueError(f"{name}: checkpoint shape {q.shape} != module weight {tuple(module.weight.shape)}")
        bias = None if module.bias is None else torch.zeros_like(module.bias, dtype=compute_dtype)
        model.set_submodule(name, NF4Linear.from_quant(q, bias, compute_dtype=compute_dtype))
    return model.load_state_dict(state_dict, strict=strict)


def load_nf4_checkpoint(model: nn.Module, path: str | Path, *, compute_dtype: torch.dtype = torch.bfloat16,
                        strict: bool = True):
    """Load `path` (a .safetensors file, or a directory of them: transformers' save_pretrained output)."""
    from safetensors.torch import load_file

    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"path={str(path)!r}: no .safetensors file found")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if _tied_head_missing(model, state):
        state["lm_head.weight"] = state[_embedding_key(state)]
    return load_nf4_state_dict(model, state, compute_dtype=compute_dtype, strict=strict)


def _embedding_key(state: dict) -> str:
    return next(k for k in state if k.endswith("embed_tokens.weight"))


def _tied_head_missing(model: nn.Module, state: dict) -> bool:
    # transformers drops a tied lm_head from the file; the model built from its config ties it back
    cfg = getattr(model, "config", None)
    return (bool(getattr(cfg, "tie_word_embeddings", False)) and "lm_head.weight" not in state
            and any(k.endswith("embed_tokens.weight") for k in state))


def nf4_weight_from_bnb(weight) -> NF4Weight:
    """View a bitsandbytes Params4bit (a Linear4bit's `.weight`) holding NF4 as an NF4Weight; no copy.

    Raises ValueError for FP4 weights or weights not yet quantized (bitsandbytes quantizes on `.to(device)`).
    """
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        raise ValueError("weight: no quant_state (not a quantized bitsandbytes Params4bit)")
    if qs.quant_type != "nf4":
        raise ValueError(f"weight: quant_type={qs.quant_type!r}, only 'nf4' is supported")
    nested = getattr(qs, "nested", False)
    if nested and qs.state2.blocksize != 256:
        raise ValueError(f"weight: nested blocksize {qs.state2.blocksize}, expected 256")
    packed = weight.data.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)  # a quant_storage other than uint8 holds the same bytes
    q = NF4Weight(packed, qs.absmax, qs.state2.absmax if nested else None, qs.state2.code if nested else None,
                  _offset(qs) if nested else 0.0, qs.code, int(qs.blocksize), tuple(int(s) for s in qs.shape), qs.dtype)
    check_weight(q)  # the sizes the kernels rely on: quantize_nf4 checks its own, a bitsandbytes state is checked here
    return q


def _offset(qs) -> float:
    """The nested offset as a Python float, read once per quant state: bitsandbytes keeps it as a (CUDA) tensor,
    and reading it on every forward was a host sync per 4-bit layer. Re-read if the state gets a new offset."""
    cached = getattr(qs, "_sftfuse_offset", None)
    if cached is None or cached[0] is not qs.offset:
        cached = (qs.offset, float(qs.offset))
        qs._sftfuse_offset = cached
    return cached[1]



def nf4_linear_from_bnb(module: nn.Module) -> NF4Linear:
    """An NF4Linear sharing the packed weight and quant state of a bitsandbytes Linear4bit (NF4); no copy."""
    q = nf4_weight_from_bnb(module.weight)
    bias = None if module.bias is None else module.bias.data
    return NF4Linear.from_quant(q, bias, compute_dtype=getattr(module, "compute_dtype", None) or q.dtype)
