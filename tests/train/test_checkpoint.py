"""Checkpoint I/O without the trainer: a two-parameter "adapter", AdamW and a LambdaLR, as `sftfuse train` saves them.

The model is the smallest thing `load_checkpoint` accepts: trainable parameters named like LoRALinear's
(`layer.lora_A`, `layer.lora_B`), so the PEFT keys come out as in a real run.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from sftfuse.train import adapter as ad
from sftfuse.train import checkpoint as ck
from sftfuse.train.config import TrainConfig
from sftfuse.train.control import Control
from sftfuse.train.trainer import lr_lambda


def _run(steps: int = 3, lr: float = 1e-2):
    model = nn.Module()
    model.layer = nn.Module()
    model.layer.lora_A = nn.Parameter(torch.randn(2, 5))
    model.layer.lora_B = nn.Parameter(torch.randn(7, 2))
    params = [p for p in model.parameters()]
    masters = [p.detach().clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(masters, lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(TrainConfig(warmup_steps=2), 10))
    for _ in range(steps):
        for m in masters:
            m.grad = torch.randn_like(m)
        opt.step()
        sched.step()
    return model, params, masters, opt, sched


def _save(root, model, masters, opt, sched, step=3, config=None):
    def tensors():
        return {f"{ad.PEFT_PREFIX}{n}.weight": m.detach().clone()
                for (n, _), m in zip(model.named_parameters(), masters, strict=True)}

    ck.save_checkpoint(root, step=step, rank=0, world=1, adapter_tensors=tensors, adapter_config={"r": 2},
                       optimizer=opt, scheduler=sched, state={"consumed": 12, "config": config or {}}, keep=2,
                       ctl=Control(1, 0))
    return root / f"step-{step:06d}"


def test_checkpoint_round_trip_loads_with_weights_only(tmp_path):
    """Optimizer, scheduler and every RNG come back exactly, from files torch.load(weights_only=True) accepts."""
    model, params, masters, opt, sched = _run()
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    path = _save(tmp_path, model, masters, opt, sched)
    expect = (random.random(), np.random.rand(), torch.rand(3))
    for name in ("optim.pt", "rng-0.pt"):
        torch.load(path / name, weights_only=True)  # no pickled object anywhere

    model2, params2, masters2, opt2, sched2 = _run(steps=0)
    random.seed(0)
    np.random.seed(0)
    state, rng = ck.load_checkpoint(path, rank=0, world=1, model=model2, masters=masters2, params=params2,
                                    optimizer=opt2, scheduler=sched2)
    ck.set_rng_state(rng)
    assert (random.random(), np.random.rand()) == expect[:2] and torch.equal(torch.rand(3), expect[2])
    assert state["step"] == 3 and state["consumed"] == 12
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()
    for a, b in zip(masters, masters2, strict=True):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        assert all(torch.equal(s1["state"][k][f], s2["state"][k][f]) for f in ("exp_avg", "exp_avg_sq", "step"))


class _Payload:
    """A pickle that, when unpickled, creates a file: what a planted checkpoint would do with worse code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["optim.pt", "rng-0.pt"])
def test_planted_pickle_is_refused_not_run(tmp_path, name):
    """`--resume` used to torch.load these files with weights_only=False: the planted code ran."""
    from safetensors.torch import save_file

    model, params, masters, opt, sched = _run()
    path = tmp_path / "step-000003"  # a checkpoint's files, written here as any hand could write them
    path.mkdir()
    (path / "state.json").write_text(json.dumps({"step": 3, "consumed": 12, "world_size": 1, "best_val": None,
                                                 "best_step": None, "bad_evals": 0, "val_history": []}))
    save_file({f"{ad.PEFT_PREFIX}{n}.weight": m.detach() for (n, _), m in zip(model.named_parameters(), masters)},
              str(path / ad.ADAPTER_WEIGHTS))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, path / "optim.pt")
    torch.save({"torch": torch.get_rng_state()}, path / "rng-0.pt")
    ran = tmp_path / "payload-ran"
    torch.save({"optimizer": _Payload(ran), "scheduler": _Payload(ran), "torch": _Payload(ran)}, path / name)
    model2, params2, masters2, opt2, sched2 = _run(steps=0)
    with pytest.raises(ck.CheckpointError, match=rf"{name} cannot be read safely.*never code"):
        ck.load_checkpoint(path, rank=0, world=1, model=model2, masters=masters2, params=params2,
                           optimizer=opt2, scheduler=sched2)
    assert not ran.exists()


def test_resume_config_check_names_what_changed():
    base = TrainConfig().validate().to_dict()  # as a run saves it: mode, qlora and lr filled in
    path = "runs/x/checkpoints/step-000020"
    with pytest.raises(ck.CheckpointError, match=r"lora_r: 16 -> 8; seed: 0 -> 1"):
        ck.check_resume_config(base, {**base, "lora_r": 8, "seed": 1, "lr": 0.1}, allow_config_change=True,
                               path=path)
    with pytest.raises(ck.CheckpointError, match=r"lr: 0.001 -> 0.1.*--allow-config-change"):
        ck.check_resume_config(base, {**base, "lr": 0.1}, allow_config_change=False, path=path)
    changed = {**base, "lr": 0.1, "max_steps": 90, "patience": 5, "log_every": 5, "checkpoint_interval": 7}
    assert ck.check_resume_config(base, changed, allow_config_change=True, path=path) == ["lr", "max_steps",
                                                                                           "patience"]
    assert ck.check_resume_config(base, {**base, "log_every": 5, "test_file": "t.jsonl"},
                                  allow_config_change=False, path=path) == []
    # with replay, the base model's answers to the replay prompts are training rows: how they are generated is fixed
    replay = {**base, "replay_ratio": 0.2}
    with pytest.raises(ck.CheckpointError, match="max_new_tokens"):
        ck.check_resume_config(replay, {**replay, "max_new_tokens": 9}, allow_config_change=True, path=path)


def test_apply_optimizer_options_sets_the_new_schedule():
    _, _, _, opt, sched = _run(steps=3, lr=1e-2)
    ck.apply_optimizer_options(opt, sched, lr=0.5, weight_decay=0.0)
    want = 0.5 * sched.lr_lambdas[0](3)
    assert sched.get_last_lr() == [want] and opt.param_groups[0]["lr"] == want
    assert opt.param_groups[0]["weight_decay"] == 0.0
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * sched.lr_lambdas[0](4))


def test_state_json_is_strict_json(tmp_path):
    model, params, masters, opt, sched = _run()
    path = _save(tmp_path, model, masters, opt, sched, config={"best": float("nan")})
    json.loads((path / "state.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
