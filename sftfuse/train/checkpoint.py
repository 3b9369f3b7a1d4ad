"""Checkpoint I/O of `sftfuse train`: atomic `step-N` directories that `--resume` continues from.

A checkpoint holds the adapter (PEFT format, from the fp32 masters), the optimizer and scheduler states, every
process's RNG states and the run's position (`state.json`, written last, with the run's config). It is filled in a
temporary `.tmp-*` sibling, fsynced and renamed into place (`sftfuse.train.outdir`), so a SIGKILL or a power loss
leaves either the previous checkpoint or the new one, never half of one; `latest_checkpoint` ignores the
temporaries and anything without `state.json`.

Nothing in a checkpoint is unpickled: the optimizer and scheduler states and the RNG states (Python's and NumPy's
as integer tensors, torch's as its byte tensor) are loaded with `torch.load(weights_only=True)`, which admits
tensors and plain values only, so a planted pickle is refused, not run. On resume the saved config is compared with
the new one (`check_resume_config`): what would change the model or the order of the data is refused; what changes
the optimisation from here on is refused unless `allow_config_change`, and then applied (`apply_optimizer_options`).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch

from sftfuse.train import adapter as ad
from sftfuse.train import outdir as od

CKPT_RE = re.compile(r"^step-(\d+)$")
# Options a resumed run must share with its checkpoint: they decide the model, the adapter's shape and meaning,
# the rows and their order (the data position is a count of rows of that stream), or what "best" was measured on.
FIXED = ("model", "train_file", "validation_file", "data_format", "skip_bad_rows", "max_length", "packing",
         "lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "qlora", "dtype", "batch_size",
         "grad_accum", "seed", "replay_ratio", "replay_file", "max_eval_rows",
         "mode", "freeze", "optimizer")  # issue 19: what is trained, and the optimizer state's layout
# Options that only change what is written or evaluated after training (the base evaluation is redone when its
# options change): free to change on resume. Every other option (lr, warmup_steps, min_lr_ratio, weight_decay,
# max_steps, epochs, grad_clip, patch, eval_interval, patience, and options added later) changes the optimisation
# from the resumed step on: refused unless allow_config_change, then applied.
SAFE = ("output_dir", "log_every", "checkpoint_interval", "keep_checkpoints", "gradient_checkpointing",
        "task_eval", "test_file", "max_test_rows", "probe", "max_new_tokens", "gen_batch_size", "verify_patch",
        "max_bad_steps", "probe_file")
REPLAY_FIXED = ("max_new_tokens", "gen_batch_size")  # with replay, the base's answers to the replay prompts train


class CheckpointError(od.RunError):
    """A checkpoint that cannot be read safely, or that does not fit the run resuming from it."""


# ================================================================================================= RNG states
def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    st = {"torch": torch.get_rng_state(),
          "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return st
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if "numpy" in st:
        import numpy as np

        n = st["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))


# ================================================================================================ the files
def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint: `step-N` directories only (temporary `.tmp-*` ones are ignored)."""
    if not ckpt_root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()
             and (p / "state.json").exists()]
    return max(found)[1] if found else None


def save_checkpoint(ckpt_root: Path, *, step: int, rank: int, world: int, adapter_tensors, adapter_config: dict,
                    optimizer, scheduler, state: dict, keep: int, ctl) -> None:
    """Write checkpoint `step-<step>` under `ckpt_root`; every process calls it (each saves its RNG states).

    Args:
        adapter_tensors: a callable returning the PEFT-keyed adapter tensors (called on rank 0 only).
        state: the run's position and history (JSON); `step` and `world_size` are added.
        keep: how many complete checkpoints to keep (0: all).
        ctl: the run's `control.Control` (the processes agree on where to write and on success).

    Raises:
        DiskFullError: the disk filled up; the temporary directory is gone, earlier checkpoints are untouched.
    """
    tmp = Path(ctl.from_rank0(str(od.staging_dir(ckpt_root, f"step-{step:06d}")) if rank == 0 else None))
    error = None
    try:
        od.save_torch(rng_state(), tmp / f"rng-{rank}.pt")
    except Exception as e:  # collected, so that every process learns of it and none waits for the others
        error = e
    if ctl.all_ok(error is None) and rank == 0:
        try:
            od.save_tensors(adapter_tensors(), tmp / ad.ADAPTER_WEIGHTS, metadata={"format": "pt"})
            od.write_file(tmp / ad.ADAPTER_CONFIG, json.dumps(adapter_config, indent=2))
            od.save_torch({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
            od.write_file(tmp / "state.json", od.json_text({"step": step, **state, "world_size": world}))  # last
            od.replace_dir(tmp, ckpt_root / f"step-{step:06d}")
        except Exception as e:
            error = e
    if not ctl.all_ok(error is None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(ckpt_root)
        if isinstance(error, od.DiskFullError) and last is not None:
            raise od.DiskFullError(f"{error}; the checkpoint before, {last.name}, is whole") from error
        raise error or od.RunError(f"another process failed while checkpoint {tmp} was written")
    if rank == 0:
        done = sorted((int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := CKPT_RE.match(p.name)))
        for _, p in done[:-keep] if keep else []:
            shutil.rmtree(p, ignore_errors=True)


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: state.json cannot be read ({e}); delete {path} to resume from "
                              "the checkpoint before it, or start over with --overwrite") from None


def _load_plain(file: Path):
    """torch.load with weights_only=True: tensors and plain values, never an object's code."""
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint file {file} cannot be read safely ({first}); sftfuse loads tensors "
                              f"and plain values only, never code. Delete {file.parent} to resume from the "
                              "checkpoint before it, or start over with --overwrite") from None


def load_checkpoint(path: Path, *, rank: int, world: int, model, masters, params, optimizer,
                    scheduler, keys: list[str] | None = None) -> tuple[dict, dict]:
    """Restore the adapter (into the fp32 `masters` and the model's trainable `params`), the optimizer and the
    scheduler from checkpoint `path`. Returns (state.json's dict, this process's RNG states to set later).
    `keys`: the saved key of each master (issue 19: the mode's, `modes.Mode.keys`); default PEFT's LoRA keys.

    Raises:
        CheckpointError: a file is unreadable, holds a pickled object, or does not fit the model.
    """
    from safetensors.torch import load_file

    state = read_state(path)
    if state["world_size"] != world:
        raise CheckpointError(f"checkpoint {path} was written by {state['world_size']} processes, now {world}: "
                              "resume with the same number of processes")
    try:
        tensors = load_file(str(path / ad.ADAPTER_WEIGHTS))
    except Exception as e:
        raise CheckpointError(f"checkpoint file {path / ad.ADAPTER_WEIGHTS} cannot be read ({e})") from None
    keys = keys or [f"{ad.PEFT_PREFIX}{n}.weight" for n, p in model.named_parameters() if p.requires_grad]
    missing = [k for k in keys if k not in tensors]
    if missing or any(tensors[k].shape != m.shape for k, m in zip(keys, masters)):
        raise CheckpointError(f"checkpoint {path}: its adapter does not fit this model "
                              f"({'missing ' + missing[0] if missing else 'other shapes'})")
    with torch.no_grad():
        for k, m, p in zip(keys, masters, params, strict=False):
            m.copy_(tensors[k])
            if p is not m:
                p.copy_(m)
    opt = _load_plain(path / "optim.pt")
    rng = _load_plain(path / f"rng-{rank}.pt")
    try:
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint file {path / 'optim.pt'} does not fit this run's optimizer ({e})") from None
    return state, rng


# ================================================================================================== resume
def check_resume_config(saved: dict, new: dict, *, allow_config_change: bool, path: Path) -> list[str]:
    """Compare the config a checkpoint was written with to the resuming run's. Returns the options that changed
    and are to be applied (only with `allow_config_change`).

    Raises:
        CheckpointError: an option in FIXED changed, or another non-SAFE option without `allow_config_change`.
    """
    fixed = set(FIXED) | (set(REPLAY_FIXED) if saved.get("replay_ratio") else set())
    changed = [k for k in new if k in saved and saved[k] != new[k] and (k not in SAFE or k in fixed)]
    hard = [k for k in changed if k in fixed]
    soft = [k for k in changed if k not in fixed]
    show = lambda keys: "; ".join(f"{k}: {saved[k]!r} -> {new[k]!r}" for k in keys)  # noqa: E731
    if hard:
        raise CheckpointError(f"--resume: {path} was written with other options that change the model or the data "
                              f"order ({show(hard)}); restore them, or start a new run in another output_dir")
    if soft and not allow_config_change:
        raise CheckpointError(f"--resume: {path} was written with other optimisation options ({show(soft)}); "
                              "restore them, or pass --allow-config-change to apply the new values from here on")
    return soft


def apply_optimizer_options(optimizer, scheduler, *, lr: float, weight_decay: float) -> None:
    """After loading a checkpoint: use the new peak `lr` and `weight_decay` (the loaded states hold the old ones)
    and the learning rate the (new) schedule gives at the resumed step."""
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for g, f in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        g["initial_lr"], g["weight_decay"] = lr, weight_decay
        g["lr"] = lr * f(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
