"""Training modes of `sftfuse train` (`mode=`): what is trained, how it is keyed on disk, and what a run writes.

- lora (the default since issue 18; `qlora=false`): the target linears of the frozen 16-bit base get sftfuse
  `LoRALinear` adapters; the run writes a PEFT LoRA adapter (`adapter/`).
- qlora (`qlora=true`, the default until issue 18): the same adapters over a base quantized to NF4 with double
  quantization.
- dora: PEFT's DoRA (`LoraConfig(use_dora=True)`) injected into the 16-bit base with `peft.inject_adapter_in_model`
  (the model stays a `*ForCausalLM`): each target linear computes m * (W + s B A) x / ||W + s B A||_row. There is
  no fused DoRA kernel: `patch_model` leaves PEFT's DoRA layers, and the gated MLPs made of them, to PEFT and says
  so in its report (logged at setup); the loss, RMSNorm and attention swaps still apply. The run writes PEFT's
  format (`adapter/`, `use_dora: true`, keys `...lora_A.weight`, `...lora_B.weight`, `...lora_magnitude_vector`).
- full: every weight is trained except the parameters matched by `freeze` (fnmatch patterns on parameter or module
  names, e.g. `freeze=[model.embed_tokens]`; a tied head shares the embedding's tensor, so freezing either
  freezes both). The fused loss trains the head through its dW path; the RMSNorm and attention swaps apply, and
  the fused gated MLP, which trains adapters only, leaves the dense MLPs alone (patch report). The run writes a
  model directory (`model/`: safetensors, config, generation config, tokenizer and chat template) that
  `AutoModelForCausalLM.from_pretrained` loads; it holds every weight, so `sftfuse merge` has nothing to merge.

Every mode keeps fp32 master weights of what it trains where the compute dtype is 16-bit (`sftfuse.train.optim`).
Checkpoints, the best-so-far weights of early stopping and the final output key the trained tensors the same
way: PEFT's adapter keys for the adapter modes, the model's own parameter names for a full fine-tune.

Learning rate: `lr=null` (the default) takes the mode's: 1e-3 for the adapter modes (measured: the default job's
loss is under 0.2 by step 15), 5e-5 for a full fine-tune. A full fine-tune moves every weight, and AdamW moves each
by about lr per step whatever its gradient's scale, so LoRA's 1e-3 would move the 0.02-0.1-sized weights of a
135M model by 1-5% a step and wreck what the model knew; the usual full-SFT rates are 1e-5 to 5e-5 (7B-70B
models), and the upper end suits a small model on a 60-step budget.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from sftfuse.train import adapter as ad
from sftfuse.train import outdir as od

MODES = ("full", "lora", "qlora", "dora")
DEFAULT_LR = {"full": 5e-5, "lora": 1e-3, "qlora": 1e-3, "dora": 1e-3}
FULL_MARK = "sftfuse_full.json"  # in a full fine-tune's model directory: what `sftfuse merge` recognizes


# ================================================================================================ config
def resolve_config(cfg) -> None:
    """Fill `mode`, `qlora` and `lr` of a TrainConfig in place (idempotent), or raise ValueError naming the option.

    `mode=null` means the old switch decides: `qlora=true` is mode qlora, `qlora=false` (or unset) mode lora. With
    both given they must agree. After this, `qlora` is True exactly for mode qlora, and `lr` is a number.
    """
    if cfg.mode is not None and cfg.mode not in MODES:
        raise ValueError(f"mode={cfg.mode!r}: expected one of {', '.join(MODES)}")
    mode = cfg.mode or ("qlora" if cfg.qlora else "lora")  # the default: LoRA on the 16-bit base (issue 18)
    if cfg.qlora is not None and bool(cfg.qlora) != (mode == "qlora"):
        raise ValueError(f"qlora={str(cfg.qlora).lower()} conflicts with mode={mode}: `qlora` is the old switch "
                         "(true: mode=qlora, false: mode=lora); give mode alone")
    if cfg.freeze and mode != "full":
        raise ValueError(f"freeze={cfg.freeze!r}: freezing weights applies to mode=full (mode={mode} trains its "
                         "adapters only and freezes every base weight)")
    cfg.mode, cfg.qlora = mode, mode == "qlora"
    if cfg.lr is None:
        cfg.lr = DEFAULT_LR[mode]


# ================================================================================================ the modes
def _frozen_by(model: nn.Module, patterns: list[str]) -> set[int]:
    """ids of the parameters whose name, or a module path above it, matches one of `patterns`.

    Raises:
        ValueError: a pattern matches no parameter (naming it and a few parameter names), or every one.
    """
    names = list(model.named_parameters(remove_duplicate=False))  # a tied head's own name matches too
    frozen: set[int] = set()
    for pat in patterns:
        hit = [p for n, p in names if any(fnmatch.fnmatchcase(".".join(n.split(".")[:k]), pat)
                                          for k in range(1, n.count(".") + 2))]
        if not hit:
            raise ValueError(f"freeze: pattern {pat!r} matches no parameter or module of the model (names look like "
                             f"{', '.join(n for n, _ in names[:3])})")
        frozen |= {id(p) for p in hit}
    if len(frozen) == len({id(p) for _, p in names}):
        raise ValueError(f"freeze={patterns!r}: freezes every parameter; nothing is left to train")
    return frozen


class Mode:
    """What one mode trains and writes. The adapter modes (lora, qlora) are this class; dora and full subclass it."""

    best_name = "best_adapter"  # early stopping's best-so-far weights, under output_dir
    output_name = "adapter"

    def __init__(self, cfg, model_name: str):
        self.cfg, self.model_name, self.name = cfg, model_name, cfg.mode
        self.dtype: torch.dtype | None = None  # the compute dtype, set by build()

    def build(self, model: nn.Module, dtype: torch.dtype) -> str:
        """Make `model` this mode's (freeze, quantize, add adapters) in place; returns a line for the log."""
        cfg, self.dtype = self.cfg, dtype
        if cfg.mode == "qlora":
            from sftfuse.modules.quantize import quantize_model

            quantize_model(model, compute_dtype=dtype)
        names = ad.inject_lora(model, target_modules=cfg.target_modules, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                               lora_dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora)
        return f"{len(names)} LoRA layers{'; NF4 base' if cfg.mode == 'qlora' else ''}"

    def key(self, name: str) -> str:
        """The on-disk key of trainable parameter `name` (named_parameters())."""
        return f"{ad.PEFT_PREFIX}{name}.weight"  # LoRALinear's lora_A / lora_B are bare parameters

    def keys(self, model: nn.Module) -> list[str]:
        return [self.key(n) for n, p in model.named_parameters() if p.requires_grad]

    def tensors(self, model: nn.Module, masters: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The trained tensors, keyed for disk, from the fp32 `masters` (named_parameters() order)."""
        return {k: m.detach().cpu().clone() for k, m in zip(self.keys(model), masters, strict=True)}

    @torch.no_grad()
    def load(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy keyed `tensors` into the model's trainable parameters (cast to their dtypes)."""
        params = [p for _, p in model.named_parameters() if p.requires_grad]
        keys = self.keys(model)
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ValueError(f"saved weights do not fit the model: missing {missing[:3]}")
        for k, p in zip(keys, params, strict=True):
            p.copy_(tensors[k])

    def config(self) -> dict:
        cfg = self.cfg
        return ad.peft_config(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=cfg.target_modules, use_rslora=cfg.use_rslora, base_model=self.model_name)

    def training_base(self) -> dict | None:
        """The base the adapter was trained on, for `sftfuse merge` to rebuild (`adapter.training_base`)."""
        return ad.training_base(qlora=self.cfg.mode == "qlora", dtype=self.dtype)

    def write_output(self, out: Path, tensors: dict, model: nn.Module, tok) -> Path:
        return ad.write_adapter(out / self.output_name, tensors, self.config(), training_base=self.training_base())

    def tuned_model(self, model: nn.Module, tensors: dict, dtype: torch.dtype) -> nn.Module:
        """The tuned model for evaluation (unpatched by the caller): the saved weights in, adapters merged."""
        self.load(model, tensors)
        return ad.merge_lora_(model, dtype=dtype)

    def parity_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The trained parameters whose gradients the patch-parity check compares."""
        return {n: p for n, p in model.named_parameters() if p.requires_grad}


class DoraMode(Mode):
    def build(self, model: nn.Module, dtype: torch.dtype) -> str:
        from peft import LoraConfig, inject_adapter_in_model

        cfg, self.dtype = self.cfg, dtype
        model.requires_grad_(False)
        conf = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.target_modules), use_rslora=cfg.use_rslora, use_dora=True,
                          bias="none")
        try:
            inject_adapter_in_model(conf, model)
        except ValueError as e:
            raise ValueError(f"target_modules={cfg.target_modules!r}: PEFT could not add DoRA layers ({e})") from None
        for n, p in model.named_parameters():
            p.requires_grad_(".lora_" in n)
        n_layers = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_magnitude_vector"))
        return f"{n_layers} DoRA layers (PEFT's)"

    def key(self, name: str) -> str:
        # PEFT's files drop the adapter's name ("default"); the magnitude is saved without ".weight"
        key = ad.PEFT_PREFIX + name.replace(".default.", ".").removesuffix(".default")
        return key.removesuffix(".weight") if key.endswith("lora_magnitude_vector.weight") else key

    def config(self) -> dict:
        return {**super().config(), "use_dora": True}

    def tuned_model(self, model: nn.Module, tensors: dict, dtype: torch.dtype) -> nn.Module:
        from peft.tuners.lora import LoraLayer

        self.load(model, tensors)
        with torch.no_grad():
            for name, mod in list(model.named_modules()):
                if isinstance(mod, LoraLayer):
                    mod.float()  # PEFT's DoRA merge, in fp32: the weight norm of W + s B A, then m / norm
                    mod.merge()
                    model.set_submodule(name, mod.get_base_layer().to(dtype))
        return model


class FullMode(Mode):
    best_name = "best_weights"
    output_name = "model"

    def training_base(self) -> None:
        return None  # every weight is trained: there is no base to merge into

    def build(self, model: nn.Module, dtype: torch.dtype) -> str:
        self.dtype = dtype
        model.requires_grad_(True)
        frozen = _frozen_by(model, list(self.cfg.freeze))
        for p in model.parameters():
            if id(p) in frozen:
                p.requires_grad_(False)
        n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        what = f"; frozen {n_frozen / 1e6:.2f} M by freeze={self.cfg.freeze}" if self.cfg.freeze else ""
        return f"full fine-tune{what}"

    def key(self, name: str) -> str:
        return name

    def config(self) -> dict:
        return {"sftfuse_mode": "full", "base_model_name_or_path": self.model_name, "freeze": list(self.cfg.freeze)}

    def write_output(self, out: Path, tensors: dict, model: nn.Module, tok) -> Path:
        """A model directory transformers loads: safetensors in the compute dtype, config, tokenizer, template."""
        from sftfuse.train.models import clear_gguf_flags

        self.load(model, tensors)
        clear_gguf_flags(model)
        target = out / self.output_name
        od.check_target(target, overwrite=False)
        tmp = od.staging_dir(out, self.output_name)
        try:
            with od.disk_errors(tmp):
                model.save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)
                od.write_file(tmp / FULL_MARK, json.dumps(self.config(), indent=2) + "\n")
            od.public_files(tmp)  # safetensors writes its file 0600; a model directory is for others to read
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return od.replace_dir(tmp, target)

    def tuned_model(self, model: nn.Module, tensors: dict, dtype: torch.dtype) -> nn.Module:
        self.load(model, tensors)
        return model

    def parity_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """A sample, to bound the check's memory (three fp32 copies of every gradient would be 1.6 GB for 135M
        weights): the first and the last decoder layer, the embedding (and tied head), the final norm."""
        params = super().parity_params(model)
        layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in params if ".layers." in n})
        keep = {f".layers.{i}." for i in layers[:1] + layers[-1:]}
        return {n: p for n, p in params.items() if ".layers." not in n or any(k in n for k in keep)}


def make_mode(cfg, model_name: str) -> Mode:
    return {"dora": DoraMode, "full": FullMode}.get(cfg.mode, Mode)(cfg, model_name)


# ================================================================================================ reporting
def patch_summary(report) -> str:
    """One line of a PatchReport: what runs fused, and what is left alone and why."""
    parts = {"swapped": [], "left alone": []}
    for (status, module, what), n in report.counts().items():
        parts[status].append(f"{n} {module} ({what})")
    return (f"patched: {', '.join(parts['swapped']) or 'nothing'}; "
            f"left alone: {', '.join(parts['left alone']) or 'nothing'}")


def dir_bytes(path: Path | None) -> int:
    """Bytes of the files under `path` (0 when missing)."""
    if path is None or not Path(path).exists():
        return 0
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ================================================================================================ merge
def merge_source_kind(path: str | Path) -> str:
    """What `sftfuse merge` was given: "full" (a full fine-tune's model directory, or a run directory that holds
    one), "dora" (a PEFT DoRA adapter) or "lora"."""
    p = Path(path)
    if (p / FULL_MARK).exists() or ((p / "model" / FULL_MARK).exists() and not (p / ad.ADAPTER_CONFIG).exists()):
        return "full"
    try:
        conf = json.loads((p / ad.ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        return "lora"  # read_adapter says what is wrong with it
    return "dora" if isinstance(conf, dict) and conf.get("use_dora") else "lora"


def nothing_to_merge(path: str | Path) -> od.RunError:
    p = Path(path)
    model_dir = p if (p / FULL_MARK).exists() else p / "model"
    return od.RunError(f"{path}: a full fine-tune (mode=full) has no adapter, so there is nothing to merge; its "
                       f"model directory {model_dir} holds every weight: load it with "
                       "AutoModelForCausalLM.from_pretrained, or copy it")


def merge_dora_dir(adapter_dir: str | Path, out_dir: str | Path, *, base_model: str | None = None,
                   overwrite: bool = False) -> Path:
    """`sftfuse merge` of a DoRA adapter: PEFT's own merge (magnitude and weight norm), in fp32, then safetensors
    and the tokenizer in `out_dir` (replaced whole, as for LoRA)."""
    from peft import PeftModel

    from sftfuse.train.models import load_model_and_tokenizer

    out_dir = Path(out_dir)
    od.check_target(out_dir, overwrite=overwrite)
    conf = json.loads((Path(adapter_dir) / ad.ADAPTER_CONFIG).read_text())
    src = base_model or conf.get("base_model_name_or_path")
    model, tok = load_model_and_tokenizer(None if src in (None, ad.DEFAULT_MODEL_ID) else src)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    tmp = od.staging_dir(out_dir.parent, out_dir.name)
    try:
        with od.disk_errors(tmp):
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return od.replace_dir(tmp, out_dir, overwrite=overwrite)
