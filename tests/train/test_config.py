"""TrainConfig: defaults, YAML, key=value overrides and flags, and the errors a typo gets."""

from __future__ import annotations

import re

import pytest

from sftfuse.train.cli import build_parser
from sftfuse.train.config import ALL_LINEAR, TrainConfig, load_config


def test_defaults_are_the_bundled_job():
    cfg = load_config()
    assert cfg == TrainConfig().validate()  # validate() fills the mode's defaults (mode, qlora, lr)
    assert cfg.model is None and cfg.train_file is None  # bundled model and data
    assert not cfg.qlora and cfg.mode == "lora" and cfg.packing and cfg.patch and cfg.target_modules == list(ALL_LINEAR)
    assert cfg.max_steps > 0 and 0 < cfg.lr <= 2e-3 and cfg.lora_r == 16
    assert cfg.replay_ratio > 0 and cfg.probe  # the default run holds forgetting down, and measures it


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text("lr: 2.0e-4\nlora_r: 8\nqlora: false\ntarget_modules: [q_proj, v_proj]\nmax-steps: 50\n")
    cfg = load_config(f, ["lora_r=32", "replay-ratio=0.1", "packing=off", "model=/models/x", "epochs=2"])
    assert (cfg.lr, cfg.lora_r, cfg.qlora, cfg.max_steps) == (2e-4, 32, False, 50)
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert (cfg.replay_ratio, cfg.packing, cfg.model, cfg.epochs) == (0.1, False, "/models/x", 2.0)
    assert load_config(None, ["target_modules=q_proj,o_proj"]).target_modules == ["q_proj", "o_proj"]
    assert load_config(None, ["model=null"]).model is None


@pytest.mark.parametrize(("override", "error", "match"), [
    ("lerning_rate=1e-3", ValueError, "unknown option"),
    ("lora_r=eight", TypeError, "lora_r"),
    ("lora_r=2.5", TypeError, "lora_r"),
    ("qlora=maybe", TypeError, "qlora"),
    ("lr=-1", ValueError, "lr"),
    ("dtype=fp8", ValueError, "dtype"),
    ("lora_dropout=1.5", ValueError, "lora_dropout"),
    ("batch_size=0", ValueError, "batch_size"),
    ("no_equals_sign", ValueError, "key=value"),
])
def test_bad_values_name_the_option(override, error, match):
    with pytest.raises(error, match=match):
        load_config(None, [override])


def test_yaml_must_be_a_mapping(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("- lr\n- 1e-3\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(f)


def test_cli_flags_and_positional_overrides_agree():
    args = build_parser().parse_args(["train", "--replay-ratio", "0.2", "--lora-r", "4", "lr=5e-4", "--resume",
                                      "--skip-bad-rows"])
    assert args.opt_replay_ratio == "0.2" and args.opt_lora_r == "4" and args.overrides == ["lr=5e-4"]
    assert args.resume and args.opt_skip_bad_rows == "true" and args.opt_qlora is None


def test_cli_reports_a_bad_option_in_one_line(capsys):
    from sftfuse.train.cli import main

    assert main(["train", "lerning_rate=1e-3"]) == 2
    assert "unknown option" in capsys.readouterr().err


def test_cli_bad_row_stops_with_file_and_line_before_loading_a_model(tmp_path, capsys):
    from sftfuse.train.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n')
    assert main(["train", f"train_file={bad}", "model=/nonexistent/model", f"output_dir={tmp_path / 'o'}"]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:line 2" in err


# ------------------------------------------------------------------------------------ issue 16, item 7: validation
@pytest.mark.parametrize("override", [
    "min_lr_ratio=-5", "min_lr_ratio=1.5", "min_lr_ratio=nan",  # negative lr is gradient ascent
    "grad_clip=nan", "grad_clip=inf", "grad_clip=-1",  # nan disabled clipping silently
    "keep_checkpoints=-1",  # deleted the checkpoint just written
    "lora_alpha=0", "lora_alpha=-8", "lora_alpha=inf",  # alpha 0 scales the adapter to nothing
    "lr=0", "lr=nan", "lr=inf", "lr=1e400",
    "epochs=nan", "epochs=inf", "weight_decay=nan", "weight_decay=-0.1", "replay_ratio=nan", "replay_ratio=inf",
    "lora_dropout=nan", "warmup_steps=-1", "seed=-1", f"seed={2**32}", "log_every=0", "log_every=-3",
    "max_eval_rows=-1", "max_test_rows=-2", "eval_interval=-1", "checkpoint_interval=-1", "patience=-1",
    "max_steps=-1", "max_length=0", "max_new_tokens=0", "gen_batch_size=0", "grad_accum=0", "lora_r=-4",
    "data_format=chatml", "output_dir=", "train_file=", "target_modules=[q_proj,q_proj]",
])
def test_every_field_is_range_checked(override):
    key = override.split("=", 1)[0]
    with pytest.raises(ValueError, match=key):
        load_config(None, [override])


def test_every_numeric_field_has_a_range():
    """A new int or float option must come with its range (validate() looks each one up in BOUNDS)."""
    from sftfuse.train.config import BOUNDS, field_types

    numeric = {k for k, tp in field_types().items() if tp in (int, float, int | None, float | None)}
    assert numeric == set(BOUNDS)


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"grad_clip": float("nan")}, ValueError), ({"lr": float("inf")}, ValueError),
    ({"lora_r": 2.0}, TypeError), ({"max_steps": True}, TypeError), ({"output_dir": 7}, TypeError),
    ({"packing": 1}, TypeError), ({"target_modules": "q_proj"}, TypeError),
])
def test_validate_checks_a_config_built_in_python(kwargs, error):
    """Trainer(cfg) calls validate() on a config that never went through load_config."""
    with pytest.raises(error, match=next(iter(kwargs))):
        TrainConfig(**kwargs).validate()


def test_edge_values_are_accepted():
    cfg = load_config(None, ["min_lr_ratio=0", "min_lr_ratio=1", "keep_checkpoints=0", "grad_clip=0",
                             "seed=0", f"seed={2**32 - 1}", "lora_alpha=0.5", "lr=2.0"])
    assert (cfg.min_lr_ratio, cfg.keep_checkpoints, cfg.grad_clip, cfg.seed) == (1.0, 0, 0.0, 2**32 - 1)


# ------------------------------------------------------------------------- issue 16, item 7: strings stay strings
@pytest.mark.parametrize("text", ["0777", "yes", "no", "on", "true", "1e3", "0x1F", "null", "12:30", "2024-01-01"])
def test_string_options_keep_their_text(text, tmp_path):
    """Values were YAML scalars before the field type applied: 0777 became '511', yes became 'True'."""
    assert load_config(None, [f"output_dir={text}"]).output_dir == text
    assert load_config(None, [f"model={text}"]).model == (None if text == "null" else text)
    f = tmp_path / "job.yaml"
    f.write_text(f"output_dir: {text}\nmodel: {text}\ntrain_file: '{text}'\n")
    cfg = load_config(f)
    assert cfg.output_dir == text and cfg.train_file == text  # quoted: always the text, even 'null'
    assert cfg.model == (None if text == "null" else text)
    assert load_config(None, ["target_modules=[0777, yes]"]).target_modules == ["0777", "yes"]


def test_typed_options_parse_by_their_type(tmp_path):
    cfg = load_config(None, ["max_steps=0777", "lr=1e-3", "packing=yes", "lora_alpha=16", "model='null'"])
    assert (cfg.max_steps, cfg.lr, cfg.packing, cfg.lora_alpha, cfg.model) == (777, 1e-3, True, 16.0, "null")
    f = tmp_path / "job.yaml"
    f.write_text("max_steps: 0777\nlr: 1e-3\npacking: off\ntarget_modules:\n  - q_proj\n  - 0777\nmodel: ~\n")
    cfg = load_config(f)
    assert (cfg.max_steps, cfg.lr, cfg.packing, cfg.target_modules, cfg.model) == (777, 1e-3, False,
                                                                                    ["q_proj", "0777"], None)


def test_data_is_an_alias_of_train_file(tmp_path):
    assert load_config(None, ["data=x.jsonl"]).train_file == "x.jsonl"
    f = tmp_path / "job.yaml"
    f.write_text("data: a.jsonl\ntrain_file: b.jsonl\n")
    with pytest.raises(ValueError, match="job.yaml.*line 2.*train_file"):  # the same option twice
        load_config(f)


# ------------------------------------------------------------------- issue 16, item 9: the config file's problems
@pytest.mark.parametrize(("text", "match"), [
    ("lr: [1e-3\nlora_r: 4\n", r"bad\.yaml: invalid YAML.*line"),
    ("lr: 1e-3\n  lora_r: 4\n", r"bad\.yaml: invalid YAML.*line"),
    ("lr:\n  a: 1\n", r"bad\.yaml.*line 2.*lr"),
    ("lr: 1e-3\nlr: 2e-3\n", r"bad\.yaml.*line 2.*lr.*twice"),
    (b"lr: 1e-3 \xff\n", r"bad\.yaml.*UTF-8"),
])
def test_a_malformed_config_file_is_one_valueerror_naming_it(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=match) as e:
        load_config(f)
    assert "\n" not in str(e.value)


def test_a_missing_config_file_is_a_valueerror_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"config file .*nope\.yaml: .*not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="config file .*: cannot read"):
        load_config(tmp_path)  # a directory


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    from sftfuse.train.config import check_output_dir

    f = tmp_path / "taken"
    f.write_text("x")
    for path in (f, f / "sub"):
        with pytest.raises(ValueError, match=re.escape(f"output_dir={path}: {f} is not a directory")):
            check_output_dir(str(path))
    check_output_dir(str(tmp_path / "new" / "deeper"))  # created later: fine
