"""What a run writes for people to read: the metrics log, the loss curve, report.md and the console summary."""

from __future__ import annotations

import json
from pathlib import Path

from sftfuse.train import forgetting as fg
from sftfuse.train import outdir as od


class MetricsLog:
    """`metrics.jsonl`: one JSON line per logged step, appended as the run goes (rank 0 only writes)."""

    def __init__(self, path: Path, *, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def append(self, rec: dict) -> None:
        if self.enabled:
            with od.disk_errors(self.path), open(self.path, "a") as f:
                f.write(od.json_text(rec, indent=None))  # a diverged loss as null

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                pass
        return out

    def keep_until(self, step: int) -> None:
        """Drop the lines of steps after `step` (a resumed run redoes them); everything when step is 0."""
        kept = [m for m in self.read() if m.get("step", 0) <= step] if step else []
        od.write_atomic(self.path, "".join(od.json_text(m, indent=None) for m in kept))


def plot_losses(metrics: list[dict], path: str | Path) -> Path | None:
    """Train loss per step and validation loss per evaluation, and on a second axis the forgetting probe's NLL
    rise at each evaluation (when measured), one PNG (matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nan = float("nan")  # a skipped non-finite step is null in metrics.jsonl: a gap in the curve
    train = [(m["step"], nan if m["loss"] is None else m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], nan if m["val_loss"] is None else m["val_loss"]) for m in metrics if "val_loss" in m]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=False), label="train", lw=1)
    if val:
        ax.plot(*zip(*val, strict=False), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean NLL per token)")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    rise = [(m["step"], 100 * m["probe_rise"]) for m in metrics if isinstance(m.get("probe_rise"), (int, float))]
    if rise:  # the rise is measured against the step-0 model: 0 at step 0
        rise = [(0, 0.0)] + rise
        ax2 = ax.twinx()
        ax2.plot(*zip(*rise, strict=False), "s--", color="tab:red", label="forgetting: probe NLL rise (%)")
        ax2.set_ylabel("probe NLL rise over the base (%)", color="tab:red")
        lo, hi = min(r for _, r in rise), max(r for _, r in rise)
        ax2.set_ylim(min(lo, -5) - 1, max(hi, 5) + 1)  # at least +-5%: noise stays small on the axis
        h2 = ax2.get_legend_handles_labels()
        handles = (handles[0] + h2[0], handles[1] + h2[1])
    ax.legend(*handles, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def accuracy_table(before: dict | None, after: dict | None) -> str:
    fams = sorted(set((before or {}).get("families", {})) | set((after or {}).get("families", {})))
    lines = ["| family | rows | before | after | change |", "| --- | --- | --- | --- | --- |"]
    for f in fams:
        b = (before or {}).get("families", {}).get(f)
        a = (after or {}).get("families", {}).get(f)
        n = (a or b)["total"]
        delta = f"{100 * (a['acc'] - b['acc']):+.1f} pts" if a and b else ""
        lines.append(f"| {f} | {n} | {_pct(b['acc']) if b else '-'} | {_pct(a['acc']) if a else '-'} | {delta} |")
    if before and after:
        lines.append(f"| **mean over families** | | **{_pct(before['mean_acc'])}** | **{_pct(after['mean_acc'])}** | "
                     f"**{100 * (after['mean_acc'] - before['mean_acc']):+.1f} pts** |")
    return "\n".join(lines)


def _spent_in(run: dict) -> str:
    """', of which validation 41 s and checkpoints 1 s' (the parts of the training time that train nothing)."""
    parts = [f"{name} {run[key]:.0f} s" for name, key in (("validation", "validate_seconds"),
                                                          ("checkpoints", "checkpoint_seconds")) if run.get(key)]
    return f", of which {' and '.join(parts)}" if parts else ""


def write_report(path: str | Path, *, cfg: dict, data_md: str | None, before: dict | None, after: dict | None,
                 probe: dict | None, run: dict, loss_png: str | None) -> Path:
    """report.md: data report, accuracy before/after, forgetting probe, loss curve, throughput, peak memory."""
    lines = ["# sftfuse train report", ""]
    lines += [(f"Model: `{run.get('model')}`; QLoRA: {cfg['qlora']}; LoRA r={cfg['lora_r']} alpha={cfg['lora_alpha']} "
              f"on {', '.join(cfg['target_modules'])}; dtype {run.get('dtype')}; patched: {cfg['patch']}; "
              f"{run.get('world_size', 1)} process(es) on {run.get('device')}."), ""]
    if run.get("mode"):  # issue 19: the mode, the optimizer's state and what the run saved
        lines += [(f"Mode: {run['mode']}; {run['trainable_params'] / 1e6:.2f} M trained weights; optimizer "
                   f"{run['optimizer']}, its state {run['optimizer_state_bytes'] / 2**20:.1f} MiB; saved "
                   f"{run['saved_bytes'] / 2**20:.1f} MiB."), ""]
    lines += ["## Task accuracy on the test split (before vs after)", ""]
    if before or after:
        lines += [accuracy_table(before, after), ""]
        if before and after:
            worse = [f for f in after["families"] if after["families"][f]["acc"] < before["families"][f]["acc"]]
            lines += [f"Families worse than the base: {', '.join(worse) if worse else 'none'}.", ""]
    else:
        lines += ["Not run (no test file, or task_eval=false).", ""]
    lines += ["## Forgetting", ""]
    if probe:
        lines += forgetting_lines(probe, cfg) + [""]
    else:
        lines += ["Not run (probe=false).", ""]
    lines += ["## Training", ""]
    early = "; stopped early" if run["stopped_early"] else ""
    lines += [f"- steps: {run['steps']} (of {run['planned_steps']} planned){early}"]
    if run.get("bad_steps"):
        lines += [f"- steps skipped for a non-finite loss or gradient norm: {run['bad_steps']}"]
    if run.get("stop_reason"):
        lines += [f"- stopped: {run['stop_reason']}"]
    lines += [
              f"- final train loss: {run['final_loss']:.4f}" if run.get("final_loss") is not None else "- no steps",
              f"- best validation loss: {run['best_val_loss']:.4f} at step {run['best_step']} (its adapter is kept)"
              if run.get("best_val_loss") is not None else "- no validation",
              (f"- throughput: {run['tokens_per_s']:.0f} tokens/s ({run['train_tokens']} tokens, "
              f"{run['train_seconds']:.0f} s of training{_spent_in(run)})"),
              f"- peak memory: {run['peak_memory']}",
              _parity_line(run.get("patch_parity")),
              (f"- wall time: {run['wall_seconds']:.0f} s in all (model load {run['load_seconds']:.0f} s, "
              f"evaluations and probe {run['eval_seconds']:.0f} s); process CPU time {run['cpu_seconds']:.0f} s "
              f"on {run['threads']} threads"), ""]
    if loss_png:
        lines += [f"![loss curve]({loss_png})", ""]
    lines += ["## Data report", "", data_md or "(none)", ""]
    lines += ["## Config", "", "```yaml"]
    import yaml

    lines += [yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", ""]
    return od.write_atomic(path, "\n".join(lines))


def write_outputs(out: Path, metrics: list[dict], *, cfg: dict, data_md: str | None, before: dict | None,
                  after: dict | None, probe: dict | None, run: dict, adapter_dir, quiet: bool) -> Path:
    """The end of a run: loss curve, report.md, results.json (strict JSON: NaN and infinities as null) and the
    console summary. `run` gets the last finite train loss as "final_loss". Returns report.md's path."""
    png = plot_losses(metrics, out / "loss_curve.png")
    finite = [m["loss"] for m in metrics if isinstance(m.get("loss"), (int, float))]
    run = {**run, "final_loss": finite[-1] if finite else None}
    report = write_report(out / "report.md", cfg=cfg, data_md=data_md, before=before, after=after, probe=probe,
                          run=run, loss_png=png.name if png else None)
    summary = {"run": run, "before": strip_predictions(before), "after": strip_predictions(after), "probe": probe,
               "config": cfg}
    od.write_atomic(out / "results.json", od.json_text(summary, indent=2))
    if not quiet:
        print(summary_text(run, before, after, probe, adapter_dir, report, cfg), flush=True)
    return report


def strip_predictions(evald: dict | None) -> dict | None:
    return None if evald is None else {k: v for k, v in evald.items() if k != "predictions"}


def summary_text(run: dict, before: dict | None, after: dict | None, probe: dict | None, adapter_dir,
                 report_path, cfg: dict) -> str:
    """The lines `sftfuse train` prints when it is done."""
    lines = ["", (f"sftfuse train: {run['steps']} steps in {run['train_seconds']:.0f} s "
             f"({run['tokens_per_s']:.0f} tokens/s), {run['wall_seconds']:.0f} s in all; {run['peak_memory']}")]
    if before or after:
        lines.append(accuracy_table(before, after))
    if probe:
        a = probe.get("answers")
        lines.append(f"forgetting: NLL of the base model's own answers {probe['base_nll']:.3f} -> "
                     f"{probe['tuned_nll']:.3f} ({100 * probe['relative_change']:+.1f}%), KL(base || tuned) "
                     f"{_num(probe.get('kl'))} per token"
                     + (f", general questions still answered {a['still_correct']}/{a['base_correct']}" if a else ""))
        lines += fg.warnings(probe, cfg)
    # what the mode wrote, named by its directory (`Mode.output_name`): adapter/, or model/ for a full fine-tune
    lines.append(f"{Path(adapter_dir).name}: {adapter_dir}  report: {report_path}")
    return "\n".join(lines)


def _num(x) -> str:
    return "-" if x is None or x != x else f"{x:.4f}"


def forgetting_lines(probe: dict, cfg: dict) -> list[str]:
    """The report's forgetting section: the three figures (`sftfuse.train.forgetting`) and any warning."""
    a = probe.get("answers")
    rows = ["| figure | base | tuned | change |", "| --- | --- | --- | --- |",
            (f"| probe NLL per token ({probe['n_prompts']} general prompts, the base's own answers) | "
             f"{probe['base_nll']:.3f} | {probe['tuned_nll']:.3f} | **{100 * probe['relative_change']:+.1f}%** |"),
            f"| probe KL(base \\|\\| tuned) per token | 0 | {_num(probe.get('kl'))} | |"]
    if a:
        rows.append(f"| general questions answered correctly (of {a['n_questions']}) | {a['base_correct']} | "
                    f"{a['still_correct']} | agreement **{_pct(a['agreement'])}** |")
    warn = fg.warnings(probe, cfg)
    verdict = warn or [f"Within the limits (NLL rise <= +{100 * fg.LIMITS['nll_rise']:.0f}%, agreement >= "
                       f"{100 * fg.LIMITS['agreement']:.0f}%)."]
    return rows + ["", f"Replay ratio: {cfg['replay_ratio']}. " + " ".join(verdict)]


def _parity_line(parity: dict | None) -> str:
    if not parity:
        return "- patch parity: not checked (patch=false or verify_patch=false)"
    return (f"- patch parity (first batch, {parity['tokens']} tokens, against plain PyTorch in {parity['ref_dtype']}): "
            f"loss and {parity['n_grads']} gradients of trained weights within tolerance; worst {parity['worst']} at "
            f"{parity['ratio']:.2f} of its tolerance ({parity['seconds']:.1f} s)")

