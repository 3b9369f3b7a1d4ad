"""The gain-against-forgetting front of `sftfuse train` settings: one row per finished run directory.

Each run is an ordinary `sftfuse train ... output_dir=DIR`; this reads every DIR's results.json (written at the end
of a run) and writes `OUT.md` (a table: the options that differ from the defaults, task gain, worst family, the
three forgetting figures, time) and `OUT.png` (gain against the probe's NLL rise, one labelled point per run).

    python scripts/forgetting_front.py RUN_DIR[:NOTE] [RUN_DIR[:NOTE] ...] --out bench/results/forgetting [--cpu "..."]

A NOTE (after a colon) is added to the run's setting, for what its config does not say (a different replay set).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORED = {"output_dir"}


def _setting(cfg: dict) -> str:
    sys.path.insert(0, str(ROOT))
    from sftfuse.train.config import TrainConfig

    default = TrainConfig().validate().to_dict()  # the mode-dependent defaults (lr) filled in
    diff = [f"{k}={v}" for k, v in cfg.items() if k not in IGNORED and default.get(k) != v]
    return " ".join(diff) or "(defaults)"


def run_row(run_dir: Path, note: str = "") -> dict:
    """One run's setting, task gain, worst family, forgetting figures and time, from its results.json (also read
    by `scripts/modes_table.py`)."""
    res = json.loads((run_dir / "results.json").read_text())
    before, after, probe, run = res.get("before"), res.get("after"), res.get("probe") or {}, res["run"]
    fams = (after or {}).get("families", {})
    worst = min(((after["families"][f]["acc"] - before["families"][f]["acc"], f) for f in fams), default=None)
    answers = probe.get("answers") or {}
    cfg = res.get("config", {})
    short = (f"{'QLoRA' if cfg.get('qlora') else 'LoRA'} replay {cfg.get('replay_ratio')}, {cfg.get('max_steps')} steps"
             + (f", lr {cfg['lr']:g}" if cfg.get("lr") not in (None, 1e-3) else "") + ("*" if note else ""))
    return {"setting": _setting(cfg) + (f" ({note})" if note else ""), "dir": str(run_dir), "short": short,
            "gain": 100 * (after["mean_acc"] - before["mean_acc"]) if before and after else None,
            "before": 100 * before["mean_acc"] if before else None, "after": 100 * after["mean_acc"] if after else None,
            "worst": f"{worst[1]} {100 * worst[0]:+.1f}" if worst else "-",
            "nll_rise": 100 * probe["relative_change"] if probe else None, "kl": probe.get("kl"),
            "agreement": 100 * answers["agreement"] if answers else None,
            "wall_s": run.get("wall_seconds"), "tokens_per_s": run.get("tokens_per_s"), "steps": run.get("steps")}


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def write(rows: list[dict], out: Path, cpu: str) -> None:
    lines = ["# Task gain against forgetting: `sftfuse train` settings on the default model and data", "",
             f"CPU: {cpu}; each row one run of `sftfuse train <setting>` (the options that differ from the defaults), "
             "written by `scripts/forgetting_front.py`. Gain: mean task accuracy over the nine families, after minus "
             "before. Forgetting: the probe's NLL rise and KL(base || tuned) per token over the base model's own "
             "answers to 22 general prompts, and the share of the general questions the base answered correctly that "
             "the tuned model still answers correctly. Each run: `OMP_NUM_THREADS=1 sftfuse train "
             "output_dir=DIR <setting>`; then `python scripts/forgetting_front.py DIR[:NOTE] ...` wrote this file, "
             "forgetting.json and forgetting.png (gain against the NLL rise).", "",
             "| setting | accuracy before -> after | gain (pts) | smallest family gain (pts) | probe NLL rise | "
             "probe KL | answer agreement | steps | wall time | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| `{r['setting']}` | {fmt(r['before'], '.1f')}% -> {fmt(r['after'], '.1f')}% | "
                     f"{fmt(r['gain'], '+.1f')} | {r['worst']} | {fmt(r['nll_rise'], '+.1f')}% | "
                     f"{fmt(r['kl'], '.4f')} | "
                     f"{fmt(r['agreement'], '.0f')}% | {r['steps']} | {fmt(r['wall_s'], '.0f')} s | "
                     f"{fmt(r['tokens_per_s'], '.0f')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"cpu": cpu, "runs": rows}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [r for r in rows if r["gain"] is not None and r["nll_rise"] is not None]
    for quant, color in ((True, "tab:orange"), (False, "tab:blue")):
        sel = [r for r in pts if r["short"].startswith("QLoRA") == quant]
        ax.scatter([r["nll_rise"] for r in sel], [r["gain"] for r in sel], color=color,
                   label="QLoRA (NF4 base)" if quant else "LoRA (16-bit base)")
    for r in pts:
        ax.annotate(r["short"], (r["nll_rise"], r["gain"]), fontsize=6, xytext=(4, 2), textcoords="offset points")
    ax.axvline(5, color="tab:red", ls=":", lw=1)
    ax.axhline(60, color="tab:red", ls=":", lw=1)
    ax.legend(loc="lower right", fontsize=8, title="* a note in the table", title_fontsize=7)
    ax.set_xlabel("forgetting: probe NLL rise over the base (%)")
    ax.set_ylabel("task gain (accuracy points)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "forgetting")
    ap.add_argument("--cpu", default=platform.processor() or platform.machine())
    args = ap.parse_args(argv)
    runs = [(Path(r.partition(":")[0]), r.partition(":")[2]) for r in args.runs]
    missing = [str(d) for d, _ in runs if not (d / "results.json").exists()]
    if missing:
        print(f"no results.json (unfinished run?) in: {', '.join(missing)}", file=sys.stderr)
        return 2
    write([run_row(d, note) for d, note in runs], args.out, args.cpu)
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
