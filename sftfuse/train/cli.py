"""The `sftfuse` command: train, data-check, merge, verify."""

from __future__ import annotations

import argparse
import sys


def _verify(args) -> int:
    from sftfuse.kernels.verify import run_verify

    return run_verify(args.only)


def _train(args) -> int:
    from sftfuse.train.config import TrainConfig, load_config
    from sftfuse.train.trainer import train

    flags = [f"{name}={value}" for name in TrainConfig.__dataclass_fields__
             if (value := getattr(args, f"opt_{name}", None)) is not None]
    from sftfuse.train.data import DataError

    try:
        cfg = load_config(args.config, [*flags, *args.overrides])
    except (ValueError, TypeError) as e:  # a typo in an option: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg, resume=args.resume)
    except DataError as e:  # names the file and line of the bad row
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _merge(args) -> int:
    from sftfuse.train.adapter import merge_adapter_dir

    out = merge_adapter_dir(args.adapter_dir, args.out_dir, base_model=args.base_model)
    print(f"merged model written to {out}")
    return 0


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from sftfuse.train.config import TrainConfig

    p.add_argument("--config", help="YAML file of option: value (see sftfuse/train/config.py)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides, e.g. lr=5e-4 qlora=false")
    opts = p.add_argument_group("options (each also accepted as key=value; defaults in sftfuse/train/config.py)")
    defaults = TrainConfig()
    for name in TrainConfig.__dataclass_fields__:
        flag, value = f"--{name.replace('_', '-')}", getattr(defaults, name)
        if isinstance(value, bool):  # a bare flag turns it on; `name=false` turns it off
            opts.add_argument(flag, dest=f"opt_{name}", action="store_const", const="true", help=f"default: {value}")
        else:
            opts.add_argument(flag, dest=f"opt_{name}", metavar="V", help=f"default: {value}")


def _data_check(args) -> int:
    from sftfuse.train import data

    try:
        rowset = data.read_rows(args.file, fmt=args.format, skip_bad_rows=args.skip_bad_rows)
        val = data.read_rows(args.validation, skip_bad_rows=args.skip_bad_rows) if args.validation else None
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tok = data.default_tokenizer()
    examples = data.tokenize_rows(rowset.rows, tok, max_length=args.max_length, fmt=rowset.fmt)
    report = data.quality_report(rowset, examples, max_length=args.max_length, val_rows=val)
    print(report.to_markdown())
    for line in rowset.errors:
        print(f"skipped: {line}")
    print("\n".join(report.summary_lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sftfuse", description="Fast, lean supervised fine-tuning.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune a model (defaults: SmolLM2-135M-Instruct on the bundled data)")
    _add_train_args(p)
    p.set_defaults(fn=_train)
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model and save safetensors")
    p.add_argument("adapter_dir", help="an adapter/ directory written by sftfuse train (PEFT format)")
    p.add_argument("out_dir", help="where to write the merged model and tokenizer")
    p.add_argument("--base-model", help="base model path (default: the adapter's base_model_name_or_path)")
    p.set_defaults(fn=_merge)
    p = sub.add_parser("data-check", help="validate a dataset file and print its data-quality report")
    p.add_argument("file", help=".jsonl, .json, .csv, .parquet or a datasets directory")
    p.add_argument("--max-length", type=int, default=256, help="truncation length in tokens (default 256)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad rows instead of stopping")
    p.add_argument("--format", choices=("alpaca", "prompt_completion", "messages", "text"), help="default: detect")
    p.add_argument("--validation", help="a validation file, to count train/validation overlap")
    p.add_argument("--tokenizer", help="a tokenizer directory (default: SmolLM2-135M-Instruct's)")
    p.set_defaults(fn=_data_check)
    p = sub.add_parser("verify", help="check every kernel's numerics on this machine against its reference")
    p.add_argument("--only", help="only ops whose name contains this")
    p.set_defaults(fn=_verify)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
