"""Run safety of `sftfuse train` on the tiny Llama (conftest.py): what happens to the output directory, its
checkpoints and the adapter when runs collide, crash, diverge, resume with other options or fill the disk.

The fault-injection tests run the CLI in subprocesses (SIGKILL, RLIMIT_FSIZE, torchrun); the rest run in-process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sftfuse.train import adapter as ad
from sftfuse.train import outdir as od
from sftfuse.train.checkpoint import CheckpointError, latest_checkpoint
from sftfuse.train.config import load_config
from sftfuse.train.guard import DivergedError
from sftfuse.train.trainer import Trainer, lr_lambda, train
from tests.train.common import ENV, ROOT, _cli, _losses, _overrides


def _strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as jq and JavaScript do."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))


def _cfg(tiny_dir, data_dir, out, **kw):
    return load_config(None, _overrides(tiny_dir, data_dir, out, **kw))


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------------------------------- 1: one run per dir
def test_second_run_into_the_same_output_dir_is_refused_then_overwritten(tiny_dir, data_dir, tmp_path, capsys):
    """A second plain `sftfuse train` into an output_dir used to die at its first checkpoint with
    "OSError: [Errno 39] Directory not empty: .../.tmp-step-000002-... -> .../step-000002"."""
    from sftfuse.train.cli import main

    out = tmp_path / "run"
    args = ["train", *_overrides(tiny_dir, data_dir, out)]
    assert main(args) == 0
    first = (out / "checkpoints" / "step-000002" / "optim.pt").read_bytes()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"output_dir {out} holds an earlier run (checkpoints/, adapter/" in err and "Traceback" not in err
    assert "--resume" in err and "--overwrite" in err
    assert (out / "checkpoints" / "step-000002" / "optim.pt").read_bytes() == first  # untouched
    (out / "notes.txt").write_text("mine")
    assert main([*args, "lr=0.01", "--overwrite"]) == 0
    state = json.loads((out / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["config"]["lr"] == 0.01 and (out / "notes.txt").read_text() == "mine"
    assert sorted(_losses(out)) == [1, 2, 3, 4]


def test_a_live_run_locks_its_output_dir(tiny_dir, data_dir, tmp_path):
    """Two runs into one directory used to delete each other's temporary checkpoints and truncate each other's
    metrics.jsonl; the second is now refused, naming the first one's pid."""
    cfg = _cfg(tiny_dir, data_dir, tmp_path / "run")
    first, second = Trainer(cfg, quiet=True), Trainer(cfg, resume=True, quiet=True)
    try:
        first.setup()
        with pytest.raises(od.OutputError, match=rf"in use by another sftfuse run \(pid {os.getpid()} on "):
            second.setup()
    finally:
        first.cleanup()
        second.cleanup()
    third = Trainer(cfg, resume=True, quiet=True)  # the lock goes with the run
    try:
        third.setup()
    finally:
        third.cleanup()


def test_output_dir_holding_other_files_is_refused(tiny_dir, data_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(od.OutputError, match=r"holds files sftfuse did not write \(thesis.tex\).*--overwrite"):
        train(_cfg(tiny_dir, data_dir, out), quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_a_run_from_before_markers_is_still_resumed_and_replaced(tiny_dir, data_dir, tmp_path):
    """Runs written by an sftfuse without marker files are recognised by their checkpoints and adapters."""
    out = tmp_path / "run"
    train(_cfg(tiny_dir, data_dir, out), quiet=True)
    for marker in out.rglob(od.MARKER):
        marker.unlink()
    res = train(_cfg(tiny_dir, data_dir, out, max_steps=6), resume=True, allow_config_change=True, quiet=True)
    assert res.steps == 6 and od.is_ours(out / "adapter")
    for marker in out.rglob(od.MARKER):
        marker.unlink()
    with pytest.raises(od.OutputError, match="holds an earlier run"):
        train(_cfg(tiny_dir, data_dir, out), quiet=True)
    train(_cfg(tiny_dir, data_dir, out), overwrite=True, quiet=True)
    assert sorted(_losses(out)) == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------- 3: debris of killed runs
def test_debris_of_killed_runs_is_cleaned_at_start(tiny_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_dir, data_dir, out), quiet=True)
    dead = _dead_pid()
    debris = [out / f".old-adapter-{dead}-abcd1234", out / f".tmp-best_adapter-{dead}-q1w2e3r4",
              out / "checkpoints" / f".tmp-step-000004-{dead}-abcd1234"]
    for d in [*debris, out / ".tmp-notes"]:
        d.mkdir()
    train(_cfg(tiny_dir, data_dir, out), resume=True, quiet=True)
    assert not any(d.exists() for d in debris)
    assert (out / ".tmp-notes").is_dir()  # not a name sftfuse gives its temporaries


# ------------------------------------------------------------------------------------- 5: finite-loss guard
def test_diverged_run_stops_and_keeps_the_last_good_adapter(tiny_dir, data_dir, tmp_path):
    """lr=1e30 used to give losses 6.46, NaN, NaN, NaN, exit 0, a non-finite adapter and a bare NaN in
    results.json. Now: the NaN steps are skipped, 3 in a row stop the run, the adapter is the last weights with a
    finite loss (here the initial ones: lora_B = 0), and metrics.jsonl and results.json are strict JSON."""
    out = tmp_path / "run"
    cfg = _cfg(tiny_dir, data_dir, out, lr=1e30, max_steps=8, eval_interval=0)  # max_bad_steps=3, the default
    with pytest.raises(DivergedError, match=r"not finite \(NaN or inf\) for 3 steps in a row \(steps 2-4"):
        train(cfg, quiet=True)
    recs = [_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[0]["loss"] > 0 and [r["loss"] for r in recs[1:]] == [None] * 3 and recs[3]["skipped"]
    tensors, _ = ad.read_adapter(out / "adapter")
    assert all(torch.isfinite(v).all() for v in tensors.values())
    assert all(not v.any() for k, v in tensors.items() if "lora_B" in k)
    run = _strict_json((out / "results.json").read_text())["run"]
    assert run["steps"] == 4 and run["bad_steps"] == 3 and "diverged" in run["stop_reason"]
    assert "steps skipped for a non-finite loss or gradient norm: 3" in (out / "report.md").read_text()


def test_nan_validation_loss_is_never_best(tiny_dir, data_dir, tmp_path, monkeypatch):
    """The first validation loss, NaN, used to become "best", and early stopping kept its adapter."""
    vals = iter([float("nan"), 5.0, 6.0, 7.0])
    monkeypatch.setattr(Trainer, "_validation_loss", lambda self: next(vals))
    out = tmp_path / "run"
    res = train(_cfg(tiny_dir, data_dir, out, max_steps=8, eval_interval=2, patience=2), quiet=True)
    assert res.best_step == 4 and res.best_val_loss == 5.0 and res.stopped_early and res.steps == 8
    assert _strict_json((out / "results.json").read_text())["run"]["best_step"] == 4
    recs = [_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in recs if "val_loss" in r] == [None, 5.0, 6.0, 7.0]


# ------------------------------------------------------------------------------------ 6: resume checks config
def test_resume_refuses_changed_options_and_applies_allowed_ones(tiny_dir, data_dir, tmp_path):
    """A new lora_r used to die in a traceback; a new lr was silently ignored (the scheduler restored the old)."""
    out = tmp_path / "run"
    train(_cfg(tiny_dir, data_dir, out), quiet=True)
    with pytest.raises(CheckpointError, match=r"change the model or the data order \(lora_r: 4 -> 8\)"):
        train(_cfg(tiny_dir, data_dir, out, lora_r=8), resume=True, allow_config_change=True, quiet=True)
    with pytest.raises(CheckpointError, match=r"lr: 0.003 -> 0.01.*--allow-config-change"):
        train(_cfg(tiny_dir, data_dir, out, lr=0.01), resume=True, quiet=True)
    cfg = _cfg(tiny_dir, data_dir, out, lr=0.01, max_steps=6)
    res = train(cfg, resume=True, allow_config_change=True, quiet=True)
    assert res.steps == 6
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    f = lr_lambda(cfg, 6)
    assert lrs[3] == pytest.approx(0.01 * f(2)) and lrs[6] == pytest.approx(0.01 * f(5))


# ------------------------------------------------------------------------------ acceptance: fault injection
def _run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(_cli(args), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_sigkill_at_random_moments_then_resume_reproduces_losses(tiny_dir, data_dir, tmp_path, seed):
    """5 runs, each killed at a random moment of its training (after a random number of logged steps, plus a random
    delay: before the first checkpoint, between checkpoints, or while one is written), then resumed: every step's
    loss equals the uninterrupted run's, dropout's random masks included. 8 steps, a checkpoint every 2 and a
    validation every 3. The runs go side by side (the CLI's start-up is most of their time)."""
    common = dict(max_steps=8, eval_interval=3, patience=0, lora_dropout=0.1)
    rng = random.Random(seed)
    args = {t: ["train", *_overrides(tiny_dir, data_dir, tmp_path / f"run{t}", **common)] for t in range(6)}
    procs = {t: subprocess.Popen(_cli(a), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for t, a in args.items()}  # run 0 is not killed: the reference
    plan = {t: (rng.randint(1, 7), rng.uniform(0.0, 0.03)) for t in range(1, 6)}
    pending, kill_at = dict(plan), {}
    while pending:
        now = time.monotonic()
        for t, (after, delay) in list(pending.items()):
            logged = _lines(tmp_path / f"run{t}" / "metrics.jsonl")
            if t not in kill_at and (logged >= after or procs[t].poll() is not None):
                kill_at[t] = now + delay
            if t in kill_at and now >= kill_at[t]:
                procs[t].send_signal(signal.SIGKILL)  # a no-op if it has already finished
                procs[t].wait()
                del pending[t]
        time.sleep(0.002)
    assert procs[0].wait(timeout=300) == 0
    want = _losses(tmp_path / "run0")
    # As if a kill had come while step 7's checkpoint was written: a half-full temporary of the dead process.
    half = tmp_path / "run1" / "checkpoints" / f".tmp-step-000007-{procs[1].pid}-abcd1234"
    half.mkdir(parents=True)
    (half / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    assert latest_checkpoint(half.parent) != half
    logs = {t: open(tmp_path / f"resume{t}.log", "w") for t in plan}  # noqa: SIM115
    resumed = {t: subprocess.Popen(_cli([*args[t], "--resume"]), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=logs[t]) for t in plan}
    for t, proc in resumed.items():
        done = f"run {t}: killed after {plan[t][0]} steps + {plan[t][1] * 1e3:.0f} ms"
        assert proc.wait(timeout=300) == 0, f"{done}: {(tmp_path / f'resume{t}.log').read_text()[-2000:]}"
        got = _losses(tmp_path / f"run{t}")
        assert sorted(got) == sorted(want), done
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), f"{done}: step {step}"
    assert not half.exists()  # debris cleaned at the start


def test_planted_pickle_in_a_checkpoint_is_not_run_on_resume(tiny_dir, data_dir, tmp_path):
    from tests.train.test_checkpoint import _Payload

    out = tmp_path / "run"
    args = ["train", *_overrides(tiny_dir, data_dir, out)]
    assert _run_cli(args).returncode == 0
    ran = tmp_path / "payload-ran"
    torch.save({"optimizer": _Payload(ran)}, out / "checkpoints" / "step-000002" / "optim.pt")
    res = _run_cli([*args, "--resume"])
    assert res.returncode == 1 and not ran.exists()
    assert "optim.pt cannot be read safely" in res.stderr and "Traceback" not in res.stderr


FILL_DISK = """
import resource, signal, sys
from sftfuse.train import cli, trainer
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past RLIMIT_FSIZE a write fails with EFBIG instead of killing
save = trainer.Trainer.save_checkpoint
def save_then_fill_the_disk(self):
    save(self)
    resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, resource.RLIM_INFINITY))  # no file may grow past 12 kB
trainer.Trainer.save_checkpoint = save_then_fill_the_disk
sys.exit(cli.main(sys.argv[1:]))
"""


def test_disk_full_ends_with_a_message_and_keeps_the_previous_checkpoint(tiny_dir, data_dir, tmp_path):
    """`RuntimeError: [enforce fail at inline_container.cc:672] unexpected pos` used to be all a full disk said."""
    out = tmp_path / "run"
    args = ["train", *_overrides(tiny_dir, data_dir, out, max_steps=6, eval_interval=0)]
    res = subprocess.run([sys.executable, "-c", FILL_DISK, *args], env=ENV, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "error: disk full while writing" in res.stderr and ".tmp-step-000004-" in res.stderr
    assert "the checkpoint before, step-000002, is whole" in res.stderr
    ckpts = out / "checkpoints"
    assert latest_checkpoint(ckpts) == ckpts / "step-000002"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002"]  # the temporary is gone
    train(_cfg(tiny_dir, data_dir, out, max_steps=6, eval_interval=0), resume=True, quiet=True)  # it resumes
    assert sorted(_losses(out)) == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------------------ distributed
RANKS = """
import datetime, os, sys, time
import torch.distributed as dist
init = dist.init_process_group
dist.init_process_group = lambda *a, **k: init(*a, **{**k, "timeout": datetime.timedelta(seconds=5)})
from sftfuse.train import cli, evaluation, trainer
if os.environ["RANK"] == "0":  # the base evaluation outlasts the default group's timeout
    task_eval = evaluation.task_eval
    evaluation.task_eval = lambda *a, **k: (time.sleep(8), task_eval(*a, **k))[1]
else:  # this process alone sees the validation loss rise: it would stop early on its own
    trainer.Trainer._validation_loss = lambda self: 100.0 + self.step
sys.exit(cli.main(sys.argv[1:]))
"""


def test_torchrun_ranks_follow_rank0_and_wait_for_its_evaluation(tiny_dir, data_dir, tmp_path):
    """Only rank 0 evaluates the base model: the other process used to wait for it in a collective of the default
    group, whose timeout it can outlast; and each process decided early stopping on its own validation loss."""
    import shutil

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    (tmp_path / "ranks.py").write_text(RANKS)
    out = tmp_path / "ddp"
    args = _overrides(tiny_dir, data_dir, out, grad_accum=1, max_steps=3, eval_interval=1, patience=1,
                      checkpoint_interval=2, task_eval=True, max_test_rows=2)
    res = subprocess.run([torchrun, "--nproc_per_node", "2", str(tmp_path / "ranks.py"), "train", *args], env=ENV,
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run = json.loads((out / "results.json").read_text())["run"]
    assert run["steps"] == 3 and not run["stopped_early"]
