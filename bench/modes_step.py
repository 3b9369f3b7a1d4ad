"""Seconds per training step of each `sftfuse train` mode on the default model and data, interleaved in one process.

Each mode gets its own Trainer (setup as `sftfuse train` builds it: bundled SmolLM2-135M-Instruct, bundled data,
4 x 256 packed tokens, patched, auto dtype), then the modes take steps in turn, round after round, so that a burst of
load on a shared host falls on all of them alike; wall and process-CPU seconds per step are the medians over the
timed rounds (the first round is warm-up). Also reports the optimizer state's bytes after the steps.

    python bench/modes_step.py [ROUNDS] [MODE[:OPTIMIZER] ...]   # default: 3 full lora qlora dora qlora:adamw8bit
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time

import torch

from sftfuse.train import optim as op
from sftfuse.train.config import load_config
from sftfuse.train.trainer import Trainer


def main(argv: list[str]) -> None:
    rounds = int(argv[0]) if argv else 3
    specs = argv[1:] or ["full", "lora", "qlora", "dora", "qlora:adamw8bit"]
    root = tempfile.mkdtemp(prefix="sftfuse-modes-")
    trainers = {}
    for spec in specs:
        mode, _, optimizer = spec.partition(":")
        cfg = load_config(None, [f"mode={mode}", f"optimizer={optimizer or 'adamw'}", f"output_dir={root}/{spec}",
                                 "task_eval=false", "probe=false", "eval_interval=0", "checkpoint_interval=0",
                                 "verify_patch=false"])
        t = Trainer(cfg, quiet=True)
        t.setup()
        trainers[spec] = t
    times = {s: [] for s in specs}
    for r in range(rounds + 1):
        for spec, t in trainers.items():
            w0, c0 = time.perf_counter(), time.process_time()
            rec = t._train_step()
            if r:
                times[spec].append((time.perf_counter() - w0, time.process_time() - c0, rec["loss"]))
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"cpu": cpu, "threads": torch.get_num_threads(), "rounds": rounds, "modes": {}}
    for spec, t in trainers.items():
        wall = statistics.median(x[0] for x in times[spec])
        cpus = statistics.median(x[1] for x in times[spec])
        out["modes"][spec] = {"wall_s_per_step": wall, "cpu_s_per_step": cpus, "dtype": str(t.dtype),
                              "trainable_params": sum(p.numel() for p in t.params), "optimizer": t.opt_runs,
                              "optimizer_state_bytes": op.state_bytes(t.opt)}
        t.cleanup()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
