"""The `sftfuse` command: train, data-check, merge, export-gguf, chat, verify.

What a user can cause or meet (a bad option or config file, a bad row, a missing file, a full disk, Ctrl-C) ends in
one line, `error: <message>` on stderr, never a traceback; the exit code is 2 for a usage or config error (found
before anything is loaded), 1 for a run that failed, 130 for an interrupt. `SFTFUSE_DEBUG=1` re-raises those with
their traceback. Any other exception is a bug in sftfuse and keeps its traceback, which is what a report needs.

Parsing: no parser accepts an abbreviated option (`--data` is the training file, not a prefix of `--data-format`),
and `key=value` overrides may come before, between or after the options.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import sys

import yaml

from sftfuse.train.outdir import RunError

# What bad input, the machine or a run's own checks (not a bug) raise; DataError is a ValueError.
EXPECTED_ERRORS = (RunError, ValueError, TypeError, OSError, yaml.YAMLError)
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*=")


def _debug() -> bool:
    return os.environ.get("SFTFUSE_DEBUG", "") == "1"


def error_message(e: BaseException) -> str:
    """One line for an expected error: OSErrors as `file: reason`, a full disk as such, YAML errors unwrapped."""
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return f"disk full while writing {e.filename or 'a file'} ({e.strerror})"
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        target = f" -> {e.filename2}" if e.filename2 is not None else ""
        return f"{e.filename}{target}: {e.strerror}"
    if isinstance(e, yaml.YAMLError):
        return " ".join(str(e).split())
    return str(e) or type(e).__name__


def _fail(e: BaseException, code: int) -> int:
    """Print `error: <message>` and return `code`; with SFTFUSE_DEBUG=1, re-raise `e` with its traceback."""
    if _debug():
        raise e
    print(f"error: {error_message(e)}", file=sys.stderr, flush=True)
    return code


def _verify(args) -> int:
    from sftfuse.kernels.verify import run_verify

    return run_verify(args.only)


def _train_config(args):
    """The run's config from --config, the flags and the overrides, checked before anything heavy is loaded:
    the options, the output directory, and the dtype on this machine's device."""
    from sftfuse.train.config import TrainConfig, check_output_dir, load_config
    from sftfuse.train.device import local_device, resolve_dtype

    flags = [f"{name}={value}" for name in TrainConfig.__dataclass_fields__
             if (value := getattr(args, f"opt_{name}", None)) is not None]
    cfg = load_config(args.config, [*flags, *args.overrides])
    check_output_dir(cfg.output_dir)
    resolve_dtype(cfg.dtype, local_device())
    return cfg


def _train(args) -> int:
    try:
        cfg = _train_config(args)
    except EXPECTED_ERRORS as e:  # a typo, a bad config file or output_dir: exit 2 before any load
        return _fail(e, 2)
    from sftfuse.train.trainer import train

    try:
        train(cfg, resume=args.resume, overwrite=args.overwrite, allow_config_change=args.allow_config_change)
    except OSError as e:
        if e.errno in _DISK_FULL and e.filename is None:  # a write() names no file: say where the run writes
            e.filename = f"under {cfg.output_dir}"
        raise
    return 0


def _merge(args) -> int:
    from sftfuse.train import merge, modes

    kind = modes.merge_source_kind(args.adapter_dir)  # issue 19: a full fine-tune, or DoRA (PEFT merges it)
    if kind == "full":
        raise modes.nothing_to_merge(args.adapter_dir)
    if kind == "dora":
        out = modes.merge_dora_dir(args.adapter_dir, args.out_dir, base_model=args.base_model,
                                   overwrite=args.overwrite)
        print(f"merged model written to {out}")
        return 0
    out, res = merge.merge_adapter_dir(args.adapter_dir, args.out_dir, base_model=args.base_model,
                                       overwrite=args.overwrite, merge_into=args.merge_into,
                                       fidelity_rows=args.fidelity_rows, validation_file=args.validation)
    print("\n".join(res.fidelity_lines() + [f"merged model ({res.mode} merge) written to {out}"]))
    return 0


def _export_gguf(args) -> int:
    from sftfuse.train.export_gguf import export

    path, res, check = export(args.adapter_dir, args.out, kind=args.type, base_model=args.base_model,
                              merge_into=args.merge_into, overwrite=args.overwrite, fidelity_rows=args.fidelity_rows,
                              validation_file=args.validation, check_rows=args.check_rows)
    lines = res.fidelity_lines() + [f"GGUF ({args.type}, {res.mode} merge) written to {path} "
                                    f"({path.stat().st_size / 2**20:.1f} MiB)"]
    if check:
        lines.append(f"read back by transformers: logits cosine >= {check['cosine_min']:.6f} and top-1 agreement "
                     f"{100 * check['top1']:.2f}% vs the merged model over {check['rows']} rows; tokenization "
                     + ("the same" if check["tokenization_same"] else
                        f"DIFFERS on {check['texts_differing']} of {check['texts']} texts"))
    print("\n".join(lines))
    return 0


def _chat(args) -> int:
    from sftfuse.train.chat import run_chat

    return run_chat(args)


def _add_merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", "--model", dest="base_model",
                   help="base model path (default: the adapter's base_model_name_or_path)")
    p.add_argument("--merge-into", choices=("auto", "16bit", "nf4"), default="auto",
                   help="for an adapter trained on a 4-bit base: merge into the 16-bit weights W or into "
                        "dequant(NF4(W)), what it was trained against (auto: nf4 for such adapters, else 16bit)")
    p.add_argument("--fidelity-rows", type=int, default=32,
                   help="validation rows to measure the merge on (KL and top-1 vs the adapter on its training "
                        "base); 0 skips it (default 32)")
    p.add_argument("--validation", help="validation file for the measurement (default: the bundled split)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from sftfuse.train.config import ALIASES, TrainConfig, field_types

    p.add_argument("--config", help="YAML file of option: value (see sftfuse/train/config.py)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an output_dir that holds an earlier run (its checkpoints are replaced)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept changed options that are safe to change mid-run")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides, e.g. lr=5e-4 qlora=false")
    opts = p.add_argument_group("options (each also accepted as key=value; defaults in sftfuse/train/config.py)")
    defaults = TrainConfig()
    for name in TrainConfig.__dataclass_fields__:
        flag, value = f"--{name.replace('_', '-')}", getattr(defaults, name)
        if field_types()[name] in (bool, bool | None):  # a bare flag turns it on; `name=false` off (issue 19: by type,
            # `qlora` defaults to None)
            opts.add_argument(flag, dest=f"opt_{name}", action="store_const", const="true", help=f"default: {value}")
        else:
            aliases = [f"--{a}" for a, target in ALIASES.items() if target == name]  # --data for --train-file
            opts.add_argument(flag, *aliases, dest=f"opt_{name}", metavar="V", help=f"default: {value}")


def _data_check(args) -> int:
    # The same reading and checks as `sftfuse train` (RunData), so the two agree on what is an error.
    from sftfuse.train.config import TrainConfig
    from sftfuse.train.models import load_tokenizer
    from sftfuse.train.run_data import RunData

    try:
        if args.max_length < 2:
            raise ValueError(f"--max-length {args.max_length}: expected >= 2")
        rd = RunData(TrainConfig(model=args.tokenizer, train_file=args.file, validation_file=args.validation,
                                 data_format=args.format, skip_bad_rows=args.skip_bad_rows,
                                 max_length=args.max_length, task_eval=False, probe=False))
        try:
            tok = load_tokenizer(args.tokenizer)
        except (OSError, ValueError) as e:  # a wrong path, no default model installed: one line
            print(f"error: cannot load the tokenizer {args.tokenizer or '(default model)'}: {e}", file=sys.stderr)
            return 1
        rd.check_tokens(tok)
    except ValueError as e:  # DataError names the file and line of the bad row
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = rd.report()
    print(report.to_markdown())
    for rs in (rd.train_set, rd.val_set):
        for line in rs.errors if rs is not None else ():
            print(f"skipped: {line}")
    print("\n".join(report.summary_lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False everywhere: a prefix match turned `--data FILE` into `--data-format FILE`
    ap = argparse.ArgumentParser(prog="sftfuse", description="Fast, lean supervised fine-tuning.", allow_abbrev=False)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune a model (defaults: SmolLM2-135M-Instruct on the bundled data)",
                       allow_abbrev=False)
    _add_train_args(p)
    p.set_defaults(fn=_train)
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model and save safetensors",
                       allow_abbrev=False)
    p.add_argument("adapter_dir", help="an adapter/ directory written by sftfuse train (PEFT format)")
    p.add_argument("out_dir", help="where to write the merged model and tokenizer")
    _add_merge_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an out_dir that sftfuse did not write")
    p.set_defaults(fn=_merge)
    p = sub.add_parser("export-gguf", help="merge an adapter and write one GGUF file (llama.cpp, Ollama, LM Studio)",
                       allow_abbrev=False)
    p.add_argument("adapter_dir", help="an adapter/ directory written by sftfuse train (PEFT format)")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", choices=("f16", "bf16", "q8_0"), default="f16", help="weight type (default f16)")
    _add_merge_args(p)
    p.add_argument("--check-rows", type=int, default=8,
                   help="validation rows to compare the file, read back by transformers, with the merged model; "
                        "0 skips the check (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(fn=_export_gguf)
    p = sub.add_parser("chat", help="chat with a tuned model (an adapter, a merged model or a .gguf file)",
                       allow_abbrev=False)
    p.add_argument("path", nargs="?", help="adapter directory, merged model directory or .gguf file "
                                           "(default: the base model)")
    p.add_argument("--prompt", help="answer this one prompt and exit")
    p.add_argument("--file", help="a JSONL file of prompts ({\"prompt\": ...} or {\"messages\": [...]} per line); "
                                  "one JSON answer per line on stdout")
    p.add_argument("--model", help="the base model of an adapter (default: its base_model_name_or_path)")
    p.add_argument("--system", help="a system message")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default 256")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampled")
    p.set_defaults(fn=_chat)
    p = sub.add_parser("data-check", help="validate a dataset file and print its data-quality report",
                       allow_abbrev=False)
    p.add_argument("file", help=".jsonl, .json, .csv, .parquet or a datasets directory")
    p.add_argument("--max-length", type=int, default=256, help="truncation length in tokens (default 256)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad rows instead of stopping")
    p.add_argument("--format", choices=("alpaca", "prompt_completion", "messages", "text"), help="default: detect")
    p.add_argument("--validation", help="a validation file, to count train/validation overlap")
    p.add_argument("--tokenizer", help="a tokenizer directory (default: SmolLM2-135M-Instruct's)")
    p.set_defaults(fn=_data_check)
    p = sub.add_parser("verify", help="check every kernel's numerics on this machine against its reference",
                       allow_abbrev=False)
    p.add_argument("--only", help="only ops whose name contains this")
    p.set_defaults(fn=_verify)
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; `train`'s `key=value` overrides may sit anywhere among its options (argparse alone
    takes positionals only in the first run of them: `output_dir=D --resume lr=1e-3` left `lr=1e-3` over)."""
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if extra and getattr(args, "command", None) == "train" and all(_OVERRIDE.match(x) for x in extra):
        args.overrides = [*args.overrides, *extra]  # after the first run: later overrides still win
    elif extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _ignore_file_size_signal() -> None:
    """Past RLIMIT_FSIZE the kernel sends SIGXFSZ, which kills the process without a word; ignored, the write fails
    with EFBIG instead and the run ends with "disk full while writing ..." (and its last checkpoint intact)."""
    import threading

    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    """Run one `sftfuse` command; returns its exit code (argparse exits with 2 on a malformed command line)."""
    args = parse_args(argv)
    _ignore_file_size_signal()
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        if _debug():
            raise
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    except EXPECTED_ERRORS as e:
        return _fail(e, 1)


if __name__ == "__main__":
    sys.exit(main())
