"""The training modes side by side: one row per finished `sftfuse train mode=M [optimizer=O]` run directory.

Reads each DIR's results.json and writes `OUT.md` (the table README shows) and `OUT.json` (the rows): the mode and
optimizer, trained weights, task accuracy before and after (mean of the nine families) and the worst family's
change, the three forgetting figures (probe NLL rise, KL(base || tuned), answer agreement), the median seconds of a
training step (from metrics.jsonl: the time between consecutive steps, so a validation or a checkpoint falls on
one step and the median leaves it out), the training loop's seconds per step and tokens/s with its validations and
checkpoints, the process's peak RSS, the optimizer state's bytes, the bytes the run's output takes on disk, and
the run's wall time.

    python scripts/modes_table.py RUN_DIR [RUN_DIR ...] --out bench/results/modes [--steps STEPS.json] [--cpu "..."]
        [--note "..."]

--steps takes the JSON `bench/modes_step.py` prints (the modes' steps timed interleaved in one process, where a
change of the host's speed falls on every mode alike) and adds its wall seconds per step as a column.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from forgetting_front import fmt, run_row  # scripts/, beside this file


def _median_step(run_dir: Path) -> float | None:
    elapsed = [
        json.loads(ln).get("elapsed_s") for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()
    ]
    gaps = sorted(b - a for a, b in zip(elapsed, elapsed[1:], strict=False) if a is not None and b is not None)
    return gaps[len(gaps) // 2] if gaps else None


def _row(run_dir: Path) -> dict:
    """`forgetting_front.run_row`'s gain and forgetting figures, with the mode's own: what it trained, its speed,
    memory, optimizer state and output size."""
    res = json.loads((run_dir / "results.json").read_text())
    run, steps = res["run"], res["run"].get("steps") or 0
    return {
        **{k: v for k, v in run_row(run_dir).items() if k not in ('setting', 'short')},  # the front's labels
        "mode": run.get("mode"),
        "optimizer": run.get("optimizer"),
        "trainable_params": run.get("trainable_params"),
        "median_step_s": _median_step(run_dir),
        "loop_s_per_step": run["train_seconds"] / steps if steps else None,
        "peak_memory": run.get("peak_memory"),
        "optimizer_state_bytes": run.get("optimizer_state_bytes"),
        "saved_bytes": run.get("saved_bytes"),
        "threads": run.get("threads"),
    }


def _spec(row: dict) -> str:
    return row["mode"] + ("" if row["optimizer"] == "adamw" else f":{row['optimizer']}")


def _bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def table(rows: list[dict]) -> list[str]:
    head = (
        "mode",
        "optimizer",
        "trained weights",
        "accuracy before -> after",
        "gain (pts)",
        "worst family",
        "probe NLL rise",
        "KL",
        "agreement",
        "s/step (interleaved)",
        "s/step (median in the run)",
        "loop s/step",
        "tokens/s",
        "peak RSS",
        "optimizer state",
        "output on disk",
        "wall",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        peak = (r["peak_memory"] or "-").split(" RSS")[0]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["mode"],
                    r["optimizer"],
                    f"{r['trainable_params'] / 1e6:.2f} M",
                    f"{fmt(r['before'], '.1f')}% -> {fmt(r['after'], '.1f')}%",
                    fmt(r["gain"], "+.1f"),
                    r["worst"],
                    fmt(r["nll_rise"], "+.1f") + "%",
                    fmt(r["kl"], ".3f"),
                    fmt(r["agreement"], ".1f") + "%",
                    fmt(r.get("interleaved_step_s"), ".2f"),
                    fmt(r["median_step_s"], ".2f"),
                    fmt(r["loop_s_per_step"], ".2f"),
                    fmt(r["tokens_per_s"], ".0f"),
                    peak,
                    _bytes(r["optimizer_state_bytes"]),
                    _bytes(r["saved_bytes"]),
                    f"{r['wall_s'] / 60:.1f} min" if r["wall_s"] else "-",
                ]
            )
            + " |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cpu", default=platform.processor() or platform.machine())
    ap.add_argument("--note", default="")
    ap.add_argument("--steps", type=Path, help="bench/modes_step.py's JSON output")
    args = ap.parse_args(argv)
    rows = [_row(d) for d in args.runs]
    if args.steps:
        timed = json.loads(args.steps.read_text())["modes"]
        for r in rows:
            r["interleaved_step_s"] = (timed.get(_spec(r)) or {}).get("wall_s_per_step")
    lines = [
        "# Training modes on the default model and data",
        "",
        f"CPU: {args.cpu}. Each row one `sftfuse train mode=M optimizer=O` run with every other option at its "
        "default (same data, steps and seed), written by `scripts/modes_table.py`. s/step (interleaved): one "
        "training step of each mode, the modes taking steps in turn in one process (`bench/modes_step.py`), the "
        "figure to compare speed by; s/step (median in the run): one step of the run itself, at whatever speed the "
        "host had then; loop s/step and tokens/s: the run's training loop with its validations (and probe) and "
        "checkpoints; "
        "wall: the whole run (the base model's evaluation and replay answers, and the tuned model's, "
        "included).",
        "",
    ]
    lines += ([args.note, ""] if args.note else []) + table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"cpu": args.cpu, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
