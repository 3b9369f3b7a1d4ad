"""Merging an adapter into its base, faithfully, and measuring how faithful the merge is.

An adapter trained with `qlora=true` learned its delta `s * B @ A` against dequant(NF4(W)), the 4-bit base it saw,
not against W. Two merges are on offer:

- `16bit`: W + s * B @ A, the original weights (what PEFT's merge and `sftfuse merge` did before);
- `nf4`: dequant(NF4(W)) + s * B @ A, what the adapter was trained against. The NF4 base is rebuilt exactly as
  training built it (`adapter.TRAINING_BASE`: W cast to the run's dtype, `quantize_model` with the same block size
  and double quantization, dequantized in the run's compute dtype), so the merged weight is the trained model's
  effective weight, up to rounding. Embeddings, norms and a tied head are the training base's (W in the run's
  dtype) too. The merged model is fp32.

The fidelity figure compares the merged model with the adapter on its training base, the model as trained (the NF4
base computing in the run's dtype + the LoRA layers): per answer token of the validation rows (positions whose
next token is a response token), KL(p_trained || p_merged) in nats, averaged, and the share of those positions
where both models' top-1 token agrees. It is measured on the first `rows` rows (default 32), one row at a time.

On the default run (README, "Merging a QLoRA adapter") the `nf4` merge is the one the measurement favours; it is the
default for adapters trained on a 4-bit base. An adapter trained on a 16-bit base has one faithful merge, `16bit`.
"""

from __future__ import annotations

import copy
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sftfuse.train import adapter as ad
from sftfuse.train import outdir as od

log = logging.getLogger(__name__)

MODES = ("16bit", "nf4")
DEFAULT_QLORA_MODE = "nf4"  # what the measurement favours on the default run (README)
DEFAULT_FIDELITY_ROWS = 32
FIDELITY_MAX_LENGTH = 256


@dataclass
class Merged:
    """A merged model (fp32, eval mode) with its tokenizer, the mode used, the adapter's training-base note and the
    fidelity figures measured per mode ({"kl", "top1", "tokens", "rows"})."""

    model: nn.Module
    tok: object
    mode: str
    training_base: dict | None
    fidelity: dict[str, dict] = field(default_factory=dict)
    base_source: str | None = None  # the base model path (None: the bundled default)

    def fidelity_lines(self) -> list[str]:
        lines = []
        for mode, f in self.fidelity.items():
            mark = " (written)" if mode == self.mode else ""
            lines.append(f"merge fidelity, {mode}{mark}: mean KL {f['kl']:.3g} nats/token, top-1 agreement "
                         f"{100 * f['top1']:.2f}% over {f['tokens']} answer tokens of {f['rows']} validation rows")
        return lines


def resolve_mode(merge_into: str, note: dict | None) -> str:
    """The merge mode for `merge_into` ("auto", "16bit" or "nf4") and the adapter's training-base note."""
    if merge_into not in ("auto", *MODES):
        raise ValueError(f"merge_into={merge_into!r}: expected auto, 16bit or nf4")
    quantized = note is not None and note.get("quant") == "nf4"
    if merge_into == "nf4" and not quantized:
        raise ValueError(f"--merge-into nf4: the adapter was not trained on a 4-bit base (its {ad.TRAINING_BASE} "
                         "says a 16-bit one); use 16bit")
    if merge_into == "auto":
        return DEFAULT_QLORA_MODE if quantized else "16bit"
    return merge_into


def _base_source(config: dict, base_model: str | None) -> str | None:
    src = base_model or config.get("base_model_name_or_path")
    return None if src in (None, ad.DEFAULT_MODEL_ID) else src


def trained_model(base: nn.Module, tensors: dict, config: dict, note: dict | None) -> nn.Module:
    """The adapter on its training base, as trained: a copy of `base` (fp32) cast to the run's dtype, quantized to
    NF4 when the note says so, with LoRA layers holding the adapter (in the run's dtype). Eval mode."""
    dtype = ad.base_dtype(note) if note else torch.float32
    model = copy.deepcopy(base).to(dtype)
    if note and note.get("quant") == "nf4":
        from sftfuse.modules.quantize import quantize_model

        quantize_model(model, compute_dtype=dtype, blocksize=int(note.get("blocksize", 64)),
                       double_quant=bool(note.get("double_quant", True)))
    ad.inject_lora(model, target_modules=config["target_modules"], r=config["r"], lora_alpha=config["lora_alpha"],
                   lora_dropout=0.0, use_rslora=bool(config.get("use_rslora")))
    ad.load_adapter_tensors(model, {k: v.to(dtype) for k, v in tensors.items()})
    return model.eval()


def merged_model(base: nn.Module, tensors: dict, config: dict, note: dict | None, mode: str) -> nn.Module:
    """The merged fp32 model of `mode` (module docstring), built from a copy of the fp32 `base`."""
    if mode == "16bit":
        model = copy.deepcopy(base).float()
    elif mode == "nf4":
        from sftfuse.modules.quantize import quantize_model

        dtype = ad.base_dtype(note)
        model = quantize_model(copy.deepcopy(base).to(dtype), compute_dtype=dtype,
                               blocksize=int(note.get("blocksize", 64)), double_quant=bool(note.get("double_quant", 1)))
        ad.merge_lora_(model, dtype=torch.float32)  # NF4Linear -> nn.Linear(dequant in `dtype`, held in fp32)
        model.float()
    else:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    ad.merge_tensors_into_(model, tensors, config)
    return model.eval()


def fidelity_examples(tok, validation_file=None, *, rows: int = DEFAULT_FIDELITY_ROWS) -> list[dict]:
    """The first `rows` rows of `validation_file` (default: the bundled validation split), tokenized as training
    tokenizes them (chat template, answer tokens labelled)."""
    from sftfuse.train.data import bundled_path, read_rows
    from sftfuse.train.data_tokenize import tokenize_rows

    rs = read_rows(validation_file or bundled_path("validation"), split="validation")
    return tokenize_rows(rs.rows[:rows], tok, max_length=FIDELITY_MAX_LENGTH, fmt=rs.fmt)


@torch.no_grad()
def fidelity(reference: nn.Module, merged: nn.Module, examples: list[dict]) -> dict:
    """Mean KL(p_reference || p_merged) per answer token (nats) and top-1 agreement, over `examples`."""
    kl_sum, agree, n = 0.0, 0, 0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor(ex["labels"])
        pos = (labels[1:] != -100).nonzero().flatten()  # positions whose next token is an answer token
        if pos.numel() == 0:
            continue
        lp_ref = torch.log_softmax(reference(input_ids=ids).logits[0, pos].float(), -1)  # (T, V)
        lp_m = torch.log_softmax(merged(input_ids=ids).logits[0, pos].float(), -1)
        kl_sum += float((lp_ref.exp() * (lp_ref - lp_m)).sum())
        agree += int((lp_ref.argmax(-1) == lp_m.argmax(-1)).sum())
        n += pos.numel()
    if n == 0:
        raise ValueError("the validation rows hold no answer tokens to measure the merge on")
    return {"kl": kl_sum / n, "top1": agree / n, "tokens": n, "rows": len(examples)}


def merge(adapter_dir, *, base_model: str | None = None, merge_into: str = "auto",
          fidelity_rows: int = DEFAULT_FIDELITY_ROWS, validation_file=None, compare: bool = True) -> Merged:
    """Load the adapter's base, merge the adapter in `merge_into`'s mode and measure the merge.

    Args:
        base_model: the base model path (default: the adapter's base_model_name_or_path; the bundled default).
        merge_into: "auto" (nf4 for an adapter trained on a 4-bit base, else 16bit), "16bit" or "nf4".
        fidelity_rows: validation rows to measure on; 0 skips the measurement.
        compare: for an adapter trained on a 4-bit base, measure both modes (the other one is then discarded).

    Raises:
        FileNotFoundError: `adapter_dir` is not an adapter directory.
        ValueError: "nf4" for an adapter not trained on a 4-bit base; a bad mode; a bad validation file.
    """
    from sftfuse.train.models import load_model_and_tokenizer

    if fidelity_rows < 0:
        raise ValueError(f"fidelity_rows={fidelity_rows}: expected >= 0")
    tensors, config = ad.read_adapter(adapter_dir)
    note = ad.read_training_base(adapter_dir)
    if note is None and merge_into == "nf4":  # e.g. PEFT's own save of a QLoRA run: sftfuse's NF4 defaults
        note = ad.training_base(qlora=True, dtype=torch.bfloat16)
        log.warning("%s has no %s: assuming NF4 (block 64, double quantization) computing in bfloat16",
                    adapter_dir, ad.TRAINING_BASE)
    elif note is None:
        log.warning("%s has no %s (written by another tool or an older sftfuse): assuming a 16-bit fp32 base "
                    "(--merge-into nf4 if it was trained on sftfuse's 4-bit base)", adapter_dir, ad.TRAINING_BASE)
    mode = resolve_mode(merge_into, note)
    src = _base_source(config, base_model)
    base, tok = load_model_and_tokenizer(src, dtype=torch.float32)
    base.eval()
    result = Merged(merged_model(base, tensors, config, note, mode), tok, mode, note, base_source=src)
    if fidelity_rows:
        examples = fidelity_examples(tok, validation_file, rows=fidelity_rows)
        reference = trained_model(base, tensors, config, note)
        result.fidelity[mode] = fidelity(reference, result.model, examples)
        if compare and note and note.get("quant") == "nf4":
            other = "16bit" if mode == "nf4" else "nf4"
            result.fidelity[other] = fidelity(reference, merged_model(base, tensors, config, note, other), examples)
    return result


def merge_adapter_dir(adapter_dir: str | Path, out_dir: str | Path, *, base_model: str | None = None,
                      overwrite: bool = False, merge_into: str = "auto", fidelity_rows: int = DEFAULT_FIDELITY_ROWS,
                      validation_file=None) -> tuple[Path, Merged]:
    """`sftfuse merge`: fold the adapter into its base (`merge`) and save safetensors + tokenizer to `out_dir`.

    `out_dir` is replaced whole, and only when it is missing, empty, an earlier `sftfuse merge`'s output holding
    nothing else, or `overwrite` is true.

    Raises:
        OutputError: `out_dir` holds files sftfuse did not write (checked before the model loads).
        DiskFullError: the disk filled up (the temporary is removed, a previous `out_dir` is untouched).
    """
    out_dir = Path(out_dir)
    if out_dir.resolve() in (Path(adapter_dir).resolve(), *Path(adapter_dir).resolve().parents):
        raise od.OutputError(f"{out_dir}: the merged model would replace the adapter {adapter_dir} it is made from; "
                             "choose another directory")
    od.check_target(out_dir, overwrite=overwrite)
    od.clean_stale(out_dir.parent)
    res = merge(adapter_dir, base_model=base_model, merge_into=merge_into, fidelity_rows=fidelity_rows,
                validation_file=validation_file)
    tmp = od.staging_dir(out_dir.parent, out_dir.name)
    try:
        with od.disk_errors(tmp):
            res.model.save_pretrained(tmp, safe_serialization=True)
            res.tok.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return od.replace_dir(tmp, out_dir, overwrite=overwrite), res
