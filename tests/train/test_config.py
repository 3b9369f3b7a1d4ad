"""TrainConfig: defaults, YAML, key=value overrides and flags, and the errors a typo gets."""

from __future__ import annotations

import pytest

from sftfuse.train.cli import build_parser
from sftfuse.train.config import ALL_LINEAR, TrainConfig, load_config


def test_defaults_are_the_bundled_job():
    cfg = load_config()
    assert cfg == TrainConfig()
    assert cfg.model is None and cfg.train_file is None  # bundled model and data
    assert cfg.qlora and cfg.packing and cfg.patch and cfg.target_modules == list(ALL_LINEAR)
    assert cfg.max_steps > 0 and 0 < cfg.lr <= 2e-3 and cfg.lora_r == 16


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
