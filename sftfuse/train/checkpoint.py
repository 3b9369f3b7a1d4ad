"""Checkpoint I/O of `sftfuse train`: atomic `step-N` directories that `--resume` continues from.

A checkpoint holds the adapter (PEFT format, from the fp32 masters), the optimizer and scheduler states, every
process's RNG states and the run's position (`state.json`, written last). It is filled in a temporary `.tmp-*`
sibling and renamed into place, so a SIGKILL leaves either the previous checkpoint or the new one, never half of
one; `latest_checkpoint` ignores the temporaries and anything without `state.json`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from sftfuse.train import adapter as ad

CKPT_RE = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        st["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if "numpy" in st:
        import numpy as np

        np.random.set_state(st["numpy"])


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint: `step-N` directories only (temporary `.tmp-*` ones are ignored)."""
    if not ckpt_root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()
             and (p / "state.json").exists()]
    return max(found)[1] if found else None


def clean_temporaries(ckpt_root: Path) -> None:
    """Remove the `.tmp-*` debris a killed run left under `ckpt_root`."""
    for p in ckpt_root.glob(".tmp-*") if ckpt_root.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(ckpt_root: Path, *, step: int, rank: int, world: int, adapter_tensors, adapter_config: dict,
                    optimizer, scheduler, state: dict, keep: int) -> None:
    """Write checkpoint `step-<step>` under `ckpt_root`; every process calls it (each saves its RNG states).

    Args:
        adapter_tensors: a callable returning the PEFT-keyed adapter tensors (called on rank 0 only).
        state: the run's position and history (JSON); `step` and `world_size` are added.
        keep: how many complete checkpoints to keep (0: all).
    """
    tmp = ad.staging_dir(ckpt_root, f".tmp-step-{step:06d}-") if rank == 0 else None
    if world > 1:
        box = [str(tmp) if tmp else None]
        torch.distributed.broadcast_object_list(box, src=0)
        tmp = Path(box[0])
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        from safetensors.torch import save_file

        save_file(adapter_tensors(), str(tmp / ad.ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ad.ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        state = {"step": step, **state, "world_size": world}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))  # written last
        os.replace(tmp, ckpt_root / f"step-{step:06d}")
        done = sorted((int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := CKPT_RE.match(p.name)))
        for _, p in done[:-keep] if keep else []:
            shutil.rmtree(p, ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()


def load_checkpoint(path: Path, *, rank: int, world: int, model, masters, params, optimizer,
                    scheduler) -> tuple[dict, dict]:
    """Restore the adapter (into the fp32 `masters` and the model's trainable `params`), the optimizer and the
    scheduler from checkpoint `path`. Returns (state.json's dict, this process's RNG states to set later)."""
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    if state["world_size"] != world:
        raise ValueError(f"checkpoint {path} was written by {state['world_size']} processes, now {world}")
    tensors = load_file(str(path / ad.ADAPTER_WEIGHTS))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for n, m, p in zip(names, masters, params, strict=False):
            key = f"{ad.PEFT_PREFIX}{n}.weight"
            m.copy_(tensors[key])
            p.copy_(m)
    opt = torch.load(path / "optim.pt", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return state, torch.load(path / f"rng-{rank}.pt", weights_only=False)
