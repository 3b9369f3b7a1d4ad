"""The `sftfuse` command line: argument parsing, and one `error:` line (never a traceback) for what a user can cause.

Every test here runs `cli.main` in-process with `sftfuse.train.trainer.train` (or `merge_adapter_dir`) replaced by a
recorder, or with input that fails before anything is loaded: no model is loaded and nothing is trained.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sftfuse.train import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """Replace trainer.train with a recorder; run in tmp_path so that the default output_dir lands there."""
    import sftfuse.train.trainer as trainer

    seen: list[tuple[object, dict]] = []

    def fake_train(cfg, **kw):
        seen.append((cfg, kw))

    monkeypatch.setattr(trainer, "train", fake_train)
    monkeypatch.chdir(tmp_path)
    return seen


def _run(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- item 12: parsing
def test_no_parser_accepts_abbreviations():
    ap = cli.build_parser()
    subs = next(a for a in ap._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert not ap.allow_abbrev and all(not p.allow_abbrev for p in subs.values())


def test_data_is_the_train_file_not_a_prefix_of_data_format(calls, capsys):
    """`--data FILE` was taken by prefix matching as `--data-format FILE`."""
    assert _run(["train", "--data", "mine.jsonl"], capsys)[0] == 0
    cfg, _ = calls[-1]
    assert cfg.train_file == "mine.jsonl" and cfg.data_format is None
    assert _run(["train", "data=other.jsonl"], capsys)[0] == 0
    assert calls[-1][0].train_file == "other.jsonl"


@pytest.mark.parametrize("argv", [["train", "--dat", "x.jsonl"], ["train", "--lora", "4"], ["train", "--res"],
                                  ["merge", "a", "b", "--base", "m"], ["data-check", "f.jsonl", "--max-len", "9"]])
def test_a_prefix_of_an_option_is_refused(argv, calls, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    assert calls == []


def test_options_and_overrides_in_any_order(calls, capsys):
    """`sftfuse train output_dir=D --resume lr=1e-3` failed with "unrecognized arguments: lr=1e-3"."""
    argv = ["train", "output_dir=D", "--resume", "lr=1e-3", "--lora-r", "4", "seed=7", "--qlora", "max_steps=9"]
    assert _run(argv, capsys)[0] == 0
    cfg, kw = calls[-1]
    assert (cfg.output_dir, cfg.lr, cfg.lora_r, cfg.seed, cfg.qlora, cfg.max_steps) == ("D", 1e-3, 4, 7, True, 9)
    assert kw["resume"] is True
    with pytest.raises(SystemExit):  # a stray word is still an error
        cli.main(["train", "lr=1e-3", "--resume", "oops"])


def test_string_flags_keep_their_text(calls, capsys):
    assert _run(["train", "--output-dir", "0777", "--model", "yes"], capsys)[0] == 0
    assert (calls[-1][0].output_dir, calls[-1][0].model) == ("0777", "yes")


def test_safety_flags_reach_train_and_merge(calls, capsys, monkeypatch):
    assert _run(["train", "--overwrite", "--allow-config-change"], capsys)[0] == 0
    assert calls[-1][1] == {"resume": False, "overwrite": True, "allow_config_change": True}
    assert _run(["train"], capsys)[0] == 0
    assert calls[-1][1] == {"resume": False, "overwrite": False, "allow_config_change": False}

    import sftfuse.train.merge as merge

    merged = []
    done = merge.Merged(model=None, tok=None, mode="16bit", training_base=None)
    monkeypatch.setattr(merge, "merge_adapter_dir", lambda a, o, **kw: merged.append((a, o, kw)) or (Path(o), done))
    assert _run(["merge", "ad", "out", "--overwrite"], capsys)[0] == 0
    assert merged[-1] == ("ad", "out", {"base_model": None, "overwrite": True, "merge_into": "auto",
                                        "fidelity_rows": 32, "validation_file": None})
    assert _run(["merge", "ad", "out"], capsys)[0] == 0
    assert merged[-1][2]["overwrite"] is False


# ------------------------------------------------------------------------------- item 9 and 5: config errors, exit 2
def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("text", "match"), [("lr: [1e-3\n", "invalid YAML"), ("lr: 1\nlr: 2\n", "twice"),
                                             ("grad_clip: .nan\n", "grad_clip")])
def test_bad_config_file_is_one_line_exit_2(calls, capsys, tmp_path, text, match):
    (tmp_path / "job.yaml").write_text(text)
    code, err = _run(["train", "--config", "job.yaml"], capsys)
    line = _one_error_line(err)
    assert code == 2 and "job.yaml" in line and match in line and calls == []


def test_missing_config_file_is_one_line_exit_2(calls, capsys):
    code, err = _run(["train", "--config", "nope.yaml"], capsys)
    assert code == 2 and "nope.yaml" in _one_error_line(err) and calls == []


def test_output_dir_that_is_a_file_is_one_line_exit_2(calls, capsys, tmp_path):
    (tmp_path / "results.txt").write_text("mine")
    code, err = _run(["train", "output_dir=results.txt"], capsys)
    assert code == 2 and "output_dir=results.txt" in _one_error_line(err) and calls == []
    assert (tmp_path / "results.txt").read_text() == "mine"


@pytest.mark.parametrize("override", ["min_lr_ratio=-5", "grad_clip=nan", "keep_checkpoints=-1", "lora_alpha=0"])
def test_out_of_range_option_is_one_line_exit_2(calls, capsys, override):
    code, err = _run(["train", override], capsys)
    assert code == 2 and override.split("=")[0] in _one_error_line(err) and calls == []


def test_fp16_is_refused_before_anything_loads(calls, capsys):
    """fp16 without loss scaling underflows gradients; sftfuse has no loss scaler, so it refuses fp16."""
    code, err = _run(["train", "dtype=fp16"], capsys)
    assert code == 2 and "dtype=fp16" in _one_error_line(err) and "loss scaling" in err and calls == []


def test_resolve_dtype_refuses_fp16_naming_the_device():
    import torch

    from sftfuse.train.device import resolve_dtype

    with pytest.raises(ValueError, match="dtype=fp16 on cpu"):
        resolve_dtype("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="dtype=fp16 on cuda"):
        resolve_dtype("fp16", torch.device("cuda", 0))
    with pytest.raises(ValueError, match="dtype='fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) in (torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------- run failures: one line, exit 1
@pytest.mark.parametrize(("exc", "want"), [
    (OSError(errno.ENOSPC, "No space left on device", "/o/checkpoints/step-000002/optim.pt"),
     "error: disk full while writing /o/checkpoints/step-000002/optim.pt"),
    (OSError(errno.EFBIG, "File too large", "/o/metrics.jsonl"), "error: disk full while writing /o/metrics.jsonl"),
    (PermissionError(errno.EACCES, "Permission denied", "/o/report.md"), "error: /o/report.md: Permission denied"),
    (FileNotFoundError("model /m: no config.json"), "error: model /m: no config.json"),
    (ValueError("checkpoint /o/step-2 was written by 2 processes, now 1"), "error: checkpoint /o/step-2 was"),
    (TypeError("lora_r=2.5: expected an integer"), "error: lora_r=2.5"),
    ("run_error", "error: the loss stayed non-finite"),
])
def test_run_failures_are_one_line_exit_1(monkeypatch, capsys, tmp_path, exc, want):
    import sftfuse.train.trainer as trainer

    if exc == "run_error":  # what the trainer raises for a reason the user can act on
        from sftfuse.train.outdir import RunError

        exc = RunError("the loss stayed non-finite for 3 steps in a row; the last good adapter is kept")

    def fail(cfg, **kw):
        raise exc

    monkeypatch.setattr(trainer, "train", fail)
    code, err = _run(["train", f"output_dir={tmp_path / 'o'}"], capsys)
    assert code == 1 and _one_error_line(err).startswith(want)


def test_disk_full_without_a_file_name_names_the_output_dir(monkeypatch, capsys, tmp_path):
    import sftfuse.train.trainer as trainer

    def fail(cfg, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer, "train", fail)
    code, err = _run(["train", f"output_dir={tmp_path / 'o'}"], capsys)
    assert code == 1 and _one_error_line(err).startswith(f"error: disk full while writing under {tmp_path / 'o'}")


def test_interrupt_is_one_line(monkeypatch, capsys, tmp_path):
    import sftfuse.train.trainer as trainer

    def interrupted(cfg, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    try:
        code, err = _run(["train", f"output_dir={tmp_path / 'o'}"], capsys)
    except KeyboardInterrupt:  # escaping here would stop the whole pytest session, not fail one test
        pytest.fail("KeyboardInterrupt escaped cli.main")
    assert code == 130 and _one_error_line(err) == "error: interrupted"


def test_debug_env_and_real_bugs_keep_the_traceback(monkeypatch, capsys, tmp_path):
    import sftfuse.train.trainer as trainer

    def fail(cfg, **kw):
        raise ValueError("boom")

    monkeypatch.setattr(trainer, "train", fail)
    argv = ["train", f"output_dir={tmp_path / 'o'}"]
    assert _run(argv, capsys)[0] == 1
    monkeypatch.setenv("SFTFUSE_DEBUG", "1")
    with pytest.raises(ValueError, match="boom"):
        cli.main(argv)
    with pytest.raises(ValueError, match="lora_r"):  # config errors too
        cli.main(["train", "lora_r=0"])
    monkeypatch.delenv("SFTFUSE_DEBUG")

    def bug(cfg, **kw):
        raise RuntimeError("internal invariant broken")

    monkeypatch.setattr(trainer, "train", bug)
    with pytest.raises(RuntimeError):  # not a user's mistake: the traceback is what a bug report needs
        cli.main(argv)


def test_merge_of_a_missing_adapter_is_one_line(capsys, tmp_path):
    code, err = _run(["merge", str(tmp_path / "no-adapter"), str(tmp_path / "out")], capsys)
    assert code == 1 and "no-adapter" in _one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_file_size_limit_ends_with_a_message_not_a_signal(tmp_path):
    """RLIMIT_FSIZE sends SIGXFSZ, which kills the process with no word; the CLI ignores it, so the write fails with
    EFBIG and the run ends with "disk full". The trainer module is replaced so that nothing heavy is imported."""
    script = textwrap.dedent(f"""
        import resource, sys, types
        def train(cfg, **kw):
            with open(cfg.output_dir + "/big.bin", "wb") as f:
                f.write(b"x" * 65536)
        sys.modules["sftfuse.train.trainer"] = types.SimpleNamespace(train=train)
        from sftfuse.train import cli, config, device
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        sys.exit(cli.main(["train", "output_dir={tmp_path}"]))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert _one_error_line(proc.stderr).startswith("error: disk full while writing")
