"""LoRA adapters on disk and in a model: injection, PEFT-format save/load, merging.

`inject_lora` walks `named_modules()` once and swaps every linear leaf whose name is in `target_modules` (a plain
`nn.Linear` or an `NF4Linear`) for an sftfuse `LoRALinear`; everything else is frozen. The adapter is written the
way PEFT writes it (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module path>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r)), so
`peft.PeftModel.from_pretrained(original_model, adapter_dir)` loads it without sftfuse. `merge_lora_` folds
`W + scaling * B @ A` into plain `nn.Linear` layers (dequantizing NF4 bases first), giving an ordinary HF model;
`merge_tensors_into_` folds a saved adapter into a plain model (`sftfuse merge`: train/merge.py). Beside the adapter,
`training_base.json` notes the base it was trained against (16-bit or NF4, dtype), which a faithful merge rebuilds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from sftfuse.train import outdir as od

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# sftfuse's note of the base the adapter was trained against (PEFT ignores the file; an unknown key in
# adapter_config.json would make PEFT warn "upgrade PEFT"): {"quant": "nf4" | null, "blocksize", "double_quant",
# "dtype"}. `sftfuse merge` rebuilds that base from it: NF4(W in `dtype`) computing in `dtype`.
TRAINING_BASE = "training_base.json"
PEFT_PREFIX = "base_model.model."
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _lora_cls():
    from sftfuse.modules.linear import LoRALinear

    return LoRALinear


def _nf4_cls():
    try:
        from sftfuse.modules.linear import NF4Linear
    except ImportError:
        return ()
    return NF4Linear


def inject_lora(model: nn.Module, *, target_modules, r: int = 16, lora_alpha: float = 32.0,
                lora_dropout: float = 0.0, use_rslora: bool = False) -> list[str]:
    """Freeze `model` and wrap each targeted linear leaf in a LoRALinear. Returns the wrapped module paths.

    Raises:
        ValueError: no module matched `target_modules`.
    """
    lora_cls, nf4_cls = _lora_cls(), _nf4_cls()
    targets = set(target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    names = [name for name, mod in model.named_modules()
             if name.rpartition(".")[2] in targets and isinstance(mod, (nn.Linear, nf4_cls)) and "lm_head" not in name]
    if not names:
        raise ValueError(f"target_modules={sorted(targets)}: no linear layer of the model has one of these names")
    for name in names:
        base = model.get_submodule(name)
        model.set_submodule(name, lora_cls.from_linear(base, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                       use_rslora=use_rslora))
    return names


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> LoRALinear, in `named_modules()` order (paths relative to the *ForCausalLM)."""
    lora_cls = _lora_cls()
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, lora_cls)}


def adapter_state_dict(model: nn.Module, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """PEFT-keyed adapter tensors: `base_model.model.<path>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r)."""
    out = {}
    for name, mod in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            t = getattr(mod, part).detach()
            out[f"{PEFT_PREFIX}{name}.{part}.weight"] = (t.to(dtype) if dtype else t).contiguous().cpu()
    return out


def master_tensors(model: nn.Module, masters: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT-keyed adapter tensors taken from `masters`, the fp32 copies of the model's trainable parameters (in
    `named_parameters()` order)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    by_name = dict(zip(names, masters, strict=True))
    return {f"{PEFT_PREFIX}{mod}.{part}.weight": by_name[f"{mod}.{part}"].detach().cpu().clone()
            for mod in lora_modules(model) for part in ("lora_A", "lora_B")}


def peft_config(*, r: int, lora_alpha: float, lora_dropout: float, target_modules, use_rslora: bool,
                base_model: str | None) -> dict:
    """The fields PEFT's LoraConfig reads back (peft 0.21; tests/train/test_trainer.py loads them with PEFT)."""
    alpha = int(lora_alpha) if float(lora_alpha).is_integer() else float(lora_alpha)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(r), "lora_alpha": alpha,
            "lora_dropout": float(lora_dropout), "target_modules": sorted(set(target_modules)), "bias": "none",
            "use_rslora": bool(use_rslora), "fan_in_fan_out": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None, "base_model_name_or_path": base_model}


def training_base(*, qlora: bool, dtype: torch.dtype, blocksize: int = 64, double_quant: bool = True) -> dict:
    """What `TRAINING_BASE` records: the frozen base was `quantize_model(model.to(dtype), compute_dtype=dtype)`
    (qlora) or the 16-bit model in `dtype`."""
    return {"quant": "nf4" if qlora else None, "blocksize": int(blocksize), "double_quant": bool(double_quant),
            "dtype": str(dtype).replace("torch.", "")}


def read_training_base(adapter_dir: str | Path) -> dict | None:
    """The adapter's `TRAINING_BASE` note, or None when it has none (written by another tool or an older sftfuse)."""
    path = Path(adapter_dir) / TRAINING_BASE
    if not path.exists():
        return None
    try:
        note = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(note, dict) or note.get("quant") not in (None, "nf4") or note.get("dtype") not in _DTYPES:
        raise ValueError(f"{path}: expected {{'quant': 'nf4' or null, 'dtype': one of {sorted(_DTYPES)}, ...}}")
    return note


def base_dtype(note: dict) -> torch.dtype:
    return _DTYPES[note["dtype"]]


def write_adapter(out_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict, *,
                  overwrite: bool = False, training_base: dict | None = None) -> Path:
    """Write `tensors` and `config` (and the `training_base` note) to `out_dir` whole (a temporary sibling,
    fsynced, swapped in; `outdir`).

    Raises:
        OutputError: `out_dir` holds files sftfuse did not write and `overwrite` is false.
        DiskFullError: the disk filled up (the temporary is removed, a previous `out_dir` is untouched).
    """
    out_dir = Path(out_dir)
    od.check_target(out_dir, overwrite=overwrite)
    tmp = od.staging_dir(out_dir.parent, out_dir.name)
    try:
        od.save_tensors(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        od.write_file(tmp / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
        if training_base is not None:
            od.write_file(tmp / TRAINING_BASE, json.dumps(training_base, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return od.replace_dir(tmp, out_dir, overwrite=overwrite)


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: not an adapter directory (no {ADAPTER_CONFIG})")
    return load_file(str(adapter_dir / ADAPTER_WEIGHTS)), json.loads(cfg_path.read_text())


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-keyed tensors into the model's LoRALinear modules (shapes must match)."""
    mods = lora_modules(model)
    expected = {f"{PEFT_PREFIX}{n}.{p}.weight" for n in mods for p in ("lora_A", "lora_B")}
    missing, extra = expected - set(tensors), set(tensors) - expected
    if missing or extra:
        raise ValueError(f"adapter does not fit the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(extra)[:3]}")
    with torch.no_grad():
        for name, mod in mods.items():
            for part in ("lora_A", "lora_B"):
                getattr(mod, part).copy_(tensors[f"{PEFT_PREFIX}{name}.{part}.weight"])


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    nf4 = _nf4_cls()
    if nf4 and isinstance(layer, nf4):
        return layer.dequantize()
    return layer.weight


def _linear_like(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.requires_grad_(False)
    return lin


@torch.no_grad()
def merge_lora_(model: nn.Module, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every LoRALinear by an nn.Linear holding `W + scaling * B @ A` (computed in fp32), and every
    remaining NF4Linear by its dequantized nn.Linear. In place; returns `model`."""
    nf4 = _nf4_cls()
    for name, mod in list(lora_modules(model).items()):
        base = mod.base_layer
        w = _dense_weight(base).float() + mod.scaling * (mod.lora_B.float() @ mod.lora_A.float())
        bias = getattr(base, "bias", None)
        out_dtype = dtype or getattr(base, "compute_dtype", None) or base.weight.dtype
        model.set_submodule(name, _linear_like(w, bias, out_dtype))
    if nf4:
        for name, mod in list(model.named_modules()):
            if isinstance(mod, nf4):
                model.set_submodule(name, _linear_like(mod.dequantize(), mod.bias, dtype or mod.compute_dtype))
    return model


@torch.no_grad()
def merge_tensors_into_(model: nn.Module, tensors: dict[str, torch.Tensor], config: dict) -> list[str]:
    """Fold a PEFT-format adapter into a plain model's linear weights in place. Returns the merged paths."""
    if config.get("use_dora"):  # issue 19: W + s B A without DoRA's magnitude would be a silently wrong model
        raise ValueError("adapter is DoRA (use_dora): its magnitude vector is not folded here; merge it with "
                         "sftfuse.train.modes.merge_dora_dir (`sftfuse merge` does)")
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
    merged = []
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        layer = model.get_submodule(path)
        w = layer.weight
        w.copy_((w.float() + scaling * (b.float().to(w.device) @ a.float().to(w.device))).to(w.dtype))
        merged.append(path)
    if not merged:
        raise ValueError("adapter holds no lora_A/lora_B tensors")
    return merged
