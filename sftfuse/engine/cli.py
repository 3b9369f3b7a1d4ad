"""The `sftfuse` command: train, data-check, merge, verify."""

from __future__ import annotations

import argparse
import sys


def _verify(args) -> int:
    from sftfuse.engine.verify import run_verify

    return run_verify(args.only)


def _train(args) -> int:
    print("sftfuse train: fine-tunes SmolLM2-135M-Instruct (QLoRA, patched kernels) on the bundled dataset.\n"
          "Not built yet (issue 7).", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sftfuse", description="Fast, lean supervised fine-tuning.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune a model (defaults: SmolLM2-135M-Instruct on the bundled data)")
    p.set_defaults(fn=_train)
    p = sub.add_parser("verify", help="check every kernel's numerics on this machine against its reference")
    p.add_argument("--only", help="only ops whose name contains this")
    p.set_defaults(fn=_verify)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
