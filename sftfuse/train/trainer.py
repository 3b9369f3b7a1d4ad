"""The SFT recipe behind `sftfuse train`: setup / train / save_checkpoint / finish / cleanup, as torchtune's read.

setup:   load the model (HF directory, hub id, GGUF file, or the bundled SmolLM2-135M-Instruct) and the data;
         print and save the data-quality report; evaluate the base model on the test split and let it answer the
         forgetting-probe prompts; then quantize the frozen base to NF4 (QLoRA), wrap the target linears in
         LoRALinear, `patch_model` (fused loss, LoRA and NF4 kernels) and build AdamW over fp32 master copies of
         the adapter weights (the model computes in bf16 where the hardware does).
train:   steps of `grad_accum` micro-batches. The loss of a step is the sum of token NLLs over every micro-batch
         (and every process) divided by the number of counted tokens of the whole step (`num_items_in_batch`),
         so accumulation and DDP give the loss of one big batch. Validation loss at intervals, with early stopping
         on patience keeping the best adapter; checkpoints at intervals, written to a temporary directory and
         renamed, holding the adapter, the optimizer, the scheduler, every RNG and the data position, so that
         `--resume` reproduces the losses of an uninterrupted run and a SIGKILL never leaves a half checkpoint
         (`save_checkpoint`; the I/O is `sftfuse.train.checkpoint`'s).
finish:  keep the best adapter, write it in PEFT's format, merge it into a dense copy for the after-evaluation
         and the probe, write the loss curve, metrics and report.md (`sftfuse.train.report`).
cleanup: release the output directory's lock, tear down the process group.

Safety: the output directory is locked for the run and an earlier run's results in it are refused without
`--resume` or `--overwrite` (`outdir`); resume checks the checkpoint's config (`checkpoint`); a non-finite loss
skips the step, and `max_bad_steps` in a row stop the run with the last good adapter (`guard`).
Under `torchrun` every process runs the same CLI; gradients are averaged by DDP (gloo on CPU, NCCL on GPU),
rank 0 writes files, runs the evaluations and takes the decisions every process follows (`control`).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sftfuse.train import adapter as ad
from sftfuse.train import checkpoint as ck
from sftfuse.train import evaluation as ev
from sftfuse.train import forgetting as fg
from sftfuse.train import modes as md  # issue 19: mode=full|lora|qlora|dora
from sftfuse.train import optim as op  # issue 19: optimizer=adamw|adamw8bit|paged_adamw8bit, fp32 masters
from sftfuse.train import outdir as od
from sftfuse.train import report as rp
from sftfuse.train.base_eval import evaluate_base, general_qa
from sftfuse.train.config import TrainConfig
from sftfuse.train.control import Control
from sftfuse.train.data import pack
from sftfuse.train.device import init_distributed, peak_memory, resolve_dtype
from sftfuse.train.guard import DivergedError, FiniteGuard
from sftfuse.train.models import load_model_and_tokenizer
from sftfuse.train.optim import lr_lambda  # noqa: F401 - moved to optim.py (issue 19); imported from here by tests
from sftfuse.train.parity import check_patch_parity
from sftfuse.train.run_data import RunData


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # train loss per step (this run's, resumed steps included)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    best_val_loss: float | None = None
    stopped_early: bool = False
    before: dict | None = None
    after: dict | None = None
    probe: dict | None = None
    tokens_per_s: float = 0.0
    adapter_dir: Path | None = None
    report_path: Path | None = None
    stop_reason: str | None = None  # why a diverged run stopped (`sftfuse.train.guard`)
    bad_steps: int = 0  # steps skipped for a non-finite loss or gradient norm


# ======================================================================================================= trainer
class Trainer:
    """One SFT run. Use `train(cfg)` unless you need the pieces: `setup()`, `train()`, `finish()` (the best adapter,
    the tuned model's evaluation and the report), `cleanup()`; `save_checkpoint()` runs at `checkpoint_interval`."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, quiet: bool = False, overwrite: bool = False,
                 allow_config_change: bool = False):
        self.cfg = cfg.validate()
        self.resume, self.overwrite, self.allow_config_change = resume, overwrite, allow_config_change
        self.quiet = quiet
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.metrics = rp.MetricsLog(self.out / "metrics.jsonl")
        self.t_start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.times = {"load": 0.0, "eval": 0.0, "train": 0.0, "validate": 0.0, "checkpoint": 0.0}

    # ------------------------------------------------------------------------------------------------ setup
    def log(self, msg: str) -> None:
        if self.rank == 0 and not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def _claim_output_dir(self) -> None:
        """Rank 0 makes output_dir this run's (`outdir.claim_run_dir`: lock, earlier run, debris); every process
        learns why not. Then the checkpoint to resume from, and whether the new options fit it."""
        self.lock_fd = self.ctl.on_rank0(lambda: od.claim_run_dir(self.out, resume=self.resume,
                                                                  overwrite=self.overwrite), od.OutputError)
        self.ckpt = ck.latest_checkpoint(self.ckpt_root) if self.resume else None
        if self.resume and self.ckpt is None:
            self.log(f"--resume: no checkpoint under {self.ckpt_root}; starting from scratch")
        self.changed = [] if self.ckpt is None else ck.check_resume_config(
            ck.read_state(self.ckpt).get("config", {}), self.cfg.to_dict(), path=self.ckpt,
            allow_config_change=self.allow_config_change)

    def setup(self) -> None:
        cfg = self.cfg
        self.world, self.rank, self.device = init_distributed()
        self.ctl = Control(self.world, self.rank)  # rank 0 decides, every process hears it (`control`)
        self.metrics.enabled = self.rank == 0
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self._claim_output_dir()

        self.run_data = RunData(cfg)  # before the model: a bad row fails in a second, not after a load
        tok = self.run_data.check_tokens()  # so do rows the tokenizer refuses and data with nothing to learn
        t0 = time.perf_counter()
        self.model, self.tok = load_model_and_tokenizer(cfg.model, dtype=torch.float32, tok=tok)
        self.model.to(self.device)
        self.model_name = cfg.model or ad.DEFAULT_MODEL_ID
        self.times["load"] = time.perf_counter() - t0
        self.log(f"loaded {self.model_name} in {self.times['load']:.1f} s; compute dtype {self.dtype}, "
                 f"{self.world} process(es) on {self.device}")
        self.data_md = self.run_data.tokenize(self.tok, self.out if self.rank == 0 else None, self.log)
        self.model.to(self.dtype)
        self._evaluate_base()
        self.total_steps = self.run_data.build_train_rows(self.tok, replay=self.replay, world=self.world, log=self.log)
        self._setup_model()
        self._setup_optimizer()
        self.probe_ref = self._probe_nll()  # the adapters are still zero: the base's value, the curve's reference
        if self.ckpt is not None:
            self._load_checkpoint(self.ckpt)

    def _evaluate_base(self) -> None:
        """Test-split accuracy and probe answers of the base model (`sftfuse.train.base_eval`; rank 0's)."""
        t0 = time.perf_counter()
        saved = evaluate_base(self.cfg, self.model, self.tok, self.run_data.test_rows, resume=self.resume,
                              cache=self.out / "base_eval.json", rank=self.rank, log=self.log)
        self.before = saved.get("before")
        # every process needs the replay answers and the probe's; the others wait here while rank 0 evaluates
        self.base = b = self.ctl.from_rank0({k: v for k, v in saved.items() if k != "before"})
        self.replay = fg.answer_examples(self.tok, b.get("replay_prompts", []), b.get("replay_answers", []),
                                         finished=b.get("replay_finished", []), max_length=self.cfg.max_length)
        probe = fg.answer_examples(self.tok, b.get("probe_prompts", []), b.get("probe_answers", []),
                                   max_length=self.cfg.max_length)
        # packed as the validation rows are (per-document attention: the same tokens scored, the same loss), so the
        # probe at each validation is 3 forwards of full rows instead of 6 of padded short ones (the bundled probe)
        self.probe_rows = pack(probe, max_length=self.cfg.max_length) if self.cfg.packing else probe
        self.times["eval"] += time.perf_counter() - t0

    def _probe_nll(self) -> float | None:
        """The probe answers' mean NLL per token under the model as it trains (rank 0's), at validation time."""
        if not (self.cfg.eval_interval and self.probe_rows and self.run_data.val_rows):
            return None
        return self.ctl.from_rank0(fg.mean_loss(self.model, self.probe_rows, batch_size=self.cfg.batch_size,
                                                pad_id=self.tok.pad_token_id, packed=self.cfg.packing,
                                                mask_dtype=self.dtype, device=self.device))

    def _setup_model(self) -> None:
        cfg = self.cfg
        self.mode = md.make_mode(cfg, self.model_name)  # issue 19: what is trained (`sftfuse.train.modes`)
        built = self.mode.build(self.model, self.dtype)
        self.model.to(self.device)
        self.patched, self.parity, self.parity_due = None, None, cfg.patch and cfg.verify_patch
        if cfg.patch:
            from sftfuse.patch.patcher import patch_model

            self.patched = patch_model(self.model)
            self.log(md.patch_summary(self.patched))
            if self.patched.cpu_plan:  # the per-CPU choices (GEMM and attention dtype), and why
                self.log(self.patched.cpu_plan)
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False
        self.model.train()
        self.params = [p for n, p in self.model.named_parameters() if p.requires_grad]
        self.masters = op.make_masters(self.params)  # fp32 master weights where the params are 16-bit (`optim`)
        n_train = sum(p.numel() for p in self.params)
        self.log(f"mode {cfg.mode}: {built}, {n_train / 1e6:.2f} M trainable parameters"
                 f"{'; patched' if cfg.patch else ''}")
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           broadcast_buffers=False)

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        self.opt, self.opt_runs, why = op.build_optimizer(cfg.optimizer, self.masters, lr=cfg.lr,
                                                          weight_decay=cfg.weight_decay, device=self.device)
        op.log_choice(self.log, cfg.optimizer, self.opt_runs, why)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg, self.total_steps))
        self.step = 0
        self.consumed = 0  # rows drawn from the epoch-wise shuffled stream, over all processes
        self.best_val, self.best_step, self.bad_evals = None, None, 0
        self.val_history: list[tuple[int, float]] = []
        self._rng_by_rank: dict | None = None
        self.guard = FiniteGuard(self.masters, max_bad=cfg.max_bad_steps)

    # ------------------------------------------------------------------------------------------- checkpoints
    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        return self.mode.tensors(self.model, self.masters)

    def _adapter_config(self) -> dict:
        return self.mode.config()

    def save_checkpoint(self) -> None:
        """adapter + optimizer + scheduler + RNG (per process) + data position, to `.tmp-*` then renamed."""
        state = {"consumed": self.consumed, "best_val": self.best_val, "best_step": self.best_step,
                 "bad_evals": self.bad_evals, "val_history": self.val_history, "config": self.cfg.to_dict(),
                 "bad_in_a_row": self.guard.in_a_row, "bad_steps": self.guard.total}
        ck.save_checkpoint(self.ckpt_root, step=self.step, rank=self.rank, world=self.world,
                           adapter_tensors=self._adapter_tensors, adapter_config=self._adapter_config(),
                           optimizer=self.opt, scheduler=self.sched, state=state, keep=self.cfg.keep_checkpoints,
                           ctl=self.ctl)

    def _load_checkpoint(self, path: Path) -> None:
        state, self._rng_by_rank = ck.load_checkpoint(path, rank=self.rank, world=self.world, model=self.model,
                                                      masters=self.masters, params=self.params,
                                                      optimizer=self.opt, scheduler=self.sched,
                                                      keys=self.mode.keys(self.model))
        self.step, self.consumed = state["step"], state["consumed"]
        self.best_val, self.best_step, self.bad_evals = state["best_val"], state["best_step"], state["bad_evals"]
        self.val_history = [tuple(v) for v in state["val_history"]]
        self.guard = FiniteGuard(self.masters, max_bad=self.cfg.max_bad_steps, in_a_row=state.get("bad_in_a_row", 0),
                                 total=state.get("bad_steps", 0))
        if self.changed:  # allowed by --allow-config-change: the new values hold from this step on
            ck.apply_optimizer_options(self.opt, self.sched, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
            self.log(f"resuming with changed options: {', '.join(self.changed)}")
        self.log(f"resumed from {path} (step {self.step})")

    # ---------------------------------------------------------------------------------------------- training
    def _forward_loss(self, batch: dict, n_items) -> torch.Tensor:
        model = self.ddp or self.model
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return model(**batch, num_items_in_batch=n_items, use_cache=False).loss

    def _train_step(self) -> dict:
        cfg = self.cfg
        batches = self.run_data.step_batches(self.consumed, world=self.world, rank=self.rank,
                                         pad_id=self.tok.pad_token_id, mask_dtype=self.dtype)
        self.consumed += cfg.batch_size * cfg.grad_accum * self.world
        # Count the tokens that carry a loss (labels are shifted inside the model) over the whole step.
        n_tok = self.ctl.sum([float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))])[0]
        n_tok = torch.tensor(n_tok, dtype=torch.float32)
        n_in = sum(b.pop("n_input_tokens") for b in batches)
        n_tok_dev = n_tok.to(self.device)
        if self.parity_due:  # once, before the first update: the patched model against plain PyTorch
            self.parity_due, self.parity = False, check_patch_parity(
                self.model, batches[0], dtype=self.dtype, log=self.log, all_ok=self.ctl.all_ok,
                params=self.mode.parity_params(self.model))
        loss_sum = 0.0
        for j, b in enumerate(batches):
            sync = self.ddp is None or j == len(batches) - 1
            ctx = self.ddp.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                loss = self._forward_loss(b, n_tok_dev)
                # DDP averages gradients over processes; the loss is already divided by the global count.
                (loss * self.world).backward()
            loss_sum += float(loss.detach())
        op.grads_to_masters(self.masters, self.params)
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.masters, cfg.grad_clip if cfg.grad_clip > 0 else 1e30))
        # the step's loss over all processes, and whether any saw a non-finite gradient norm
        loss_sum, bad = self.ctl.sum([loss_sum, 0.0 if math.isfinite(gnorm) else 1.0])
        gnorm = gnorm if bad == 0 else math.nan
        finite = math.isfinite(loss_sum) and math.isfinite(gnorm)
        lr = self.sched.get_last_lr()[0]
        if finite:  # else the finite-loss guard skips the update (`sftfuse.train.guard`)
            self.guard.keep()
            self.opt.step()
        self.sched.step()  # skipped steps included: the schedule stays that of the planned steps
        self.opt.zero_grad(set_to_none=True)
        op.masters_to_params(self.masters, self.params)
        self.step += 1
        return {"step": self.step, "loss": loss_sum, "lr": lr, "grad_norm": gnorm, "tokens": int(n_tok),
                "input_tokens": n_in * self.world, **({} if finite else {"skipped": True})}

    def _validation_loss(self) -> float:
        return fg.mean_loss(self.model, self.run_data.val_rows, batch_size=self.cfg.batch_size,
                            pad_id=self.tok.pad_token_id, packed=self.cfg.packing, mask_dtype=self.dtype,
                            device=self.device)

    def _validate(self, rec: dict) -> bool:
        """Validation loss into `rec`; keeps the best adapter. Rank 0's value decides for every process (ranks
        never part ways). A NaN is never best: it counts as an evaluation without improvement. True: stop early."""
        val = self.ctl.from_rank0(self._validation_loss())
        rec["val_loss"] = val
        probe = self._probe_nll()
        if probe is not None and self.probe_ref:
            rec["probe_nll"], rec["probe_rise"] = probe, probe / self.probe_ref - 1
        self.val_history.append((self.step, val))
        if math.isfinite(val) and (self.best_val is None or val < self.best_val - 1e-4):
            self.best_val, self.best_step, self.bad_evals = val, self.step, 0
            if self.rank == 0:
                ad.write_adapter(self.out / self.mode.best_name, self._adapter_tensors(), self._adapter_config(),
                                 training_base=self.mode.training_base())
            return False
        self.bad_evals += 1
        if self.cfg.patience and self.bad_evals >= self.cfg.patience:
            best = f"best {self.best_val:.4f} at step {self.best_step}" if self.best_step is not None else "none finite"
            self.log(f"early stopping at step {self.step}: validation loss has not improved for "
                     f"{self.bad_evals} evaluations ({best})")
            return True
        return False

    def train(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.rank == 0:  # keep the metrics of the steps a resumed run does not redo
            self.metrics.keep_until(self.step if self.ckpt else 0)
        if self._rng_by_rank is not None:
            ck.set_rng_state(self._rng_by_rank)
        result = TrainResult(output_dir=self.out, steps=self.step)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=self.rank != 0 or self.quiet,
                   desc="train", unit="step", dynamic_ncols=True)
        t0, tokens, stopped, self.stop_reason = time.perf_counter(), 0, False, None
        cpu0 = time.process_time()  # issue 19: CPU seconds of training, steadier than wall time on a shared host
        losses = []
        while self.step < self.total_steps and not stopped:
            rec = self._train_step()
            tokens += rec["input_tokens"]
            elapsed = time.perf_counter() - t0
            rec["tokens_per_s"] = tokens / elapsed
            rec["elapsed_s"] = elapsed
            losses.append(rec["loss"])
            last = self.step == self.total_steps
            self.stop_reason = self.guard.record(step=self.step, finite="skipped" not in rec, lr=rec["lr"])
            if self.stop_reason:  # diverged: back to the last weights with a finite loss, and stop
                self.guard.restore()
                stopped = True
                self.log(f"step {self.step}: {self.stop_reason}")
            elif cfg.eval_interval and self.run_data.val_rows and (self.step % cfg.eval_interval == 0 or last):
                t_val = time.perf_counter()
                stopped = self._validate(rec)
                self.times["validate"] += time.perf_counter() - t_val
            if self.step % max(cfg.log_every, 1) == 0 or "val_loss" in rec:
                self.metrics.append(rec)
            if cfg.checkpoint_interval and (self.step % cfg.checkpoint_interval == 0) and not last and not stopped:
                t_ck = time.perf_counter()
                self.save_checkpoint()
                self.times["checkpoint"] += time.perf_counter() - t_ck
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                            **({"val": f"{rec['val_loss']:.3f}"} if "val_loss" in rec else {}))
            bar.update(1)
        bar.close()
        self.times["train"] = time.perf_counter() - t0
        self.times["train_cpu"] = time.process_time() - cpu0
        self.train_tokens = tokens
        result.steps, result.losses, result.stopped_early = self.step, losses, stopped
        result.stop_reason, result.bad_steps = self.stop_reason, self.guard.total
        result.val_losses = list(self.val_history)
        result.best_step, result.best_val_loss = self.best_step, self.best_val
        result.tokens_per_s = tokens / max(self.times["train"], 1e-9)
        self.result = result
        return result

    # ------------------------------------------------------------------------------------------------ cleanup
    def finish(self) -> TrainResult:
        """Keep the best adapter, save it in PEFT's format, evaluate the tuned model, write the report."""
        cfg, res = self.cfg, self.result
        best_dir = self.out / self.mode.best_name
        if self.rank == 0:
            if self.best_step is not None and best_dir.exists() and self.best_step != self.step:
                tensors, _ = ad.read_adapter(best_dir)
                self.log(f"keeping the adapter of step {self.best_step} (best validation loss {self.best_val:.4f})")
            else:
                tensors = self._adapter_tensors()
            res.adapter_dir = self.mode.write_output(self.out, tensors, self.model, self.tok)  # adapter/ or model/
        self.ctl.barrier()
        if self.rank != 0:
            return res
        if self.patched is not None:
            from sftfuse.patch.patcher import unpatch_model

            unpatch_model(self.model)
        self.model = self.mode.tuned_model(self.model, tensors, self.dtype)  # dense: fast generation
        self.model.config.use_cache = True
        self.model.eval()
        t0 = time.perf_counter()
        if self.run_data.test_rows:
            self.log("evaluating the tuned model on the test split ...")
            res.before = self.before
            res.after = ev.task_eval(self.model, self.tok, self.run_data.test_rows,
                                     max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size)
        b = self.base
        if cfg.probe and b.get("probe_answers"):
            tuned = fg.tuned_stats(self.model, self.tok, b["probe_prompts"], b["probe_answers"], b["probe_topk"])
            qa = fg.answer_probe(self.model, self.tok, general_qa(), batch_size=cfg.gen_batch_size)
            res.probe = fg.summary(b["probe_base_nll"], tuned, fg.agreement(b["qa_base_correct"], qa))
        self.times["eval"] += time.perf_counter() - t0
        run = {"model": self.model_name, "dtype": str(self.dtype).replace("torch.", ""), "world_size": self.world,
               "device": str(self.device), "steps": self.step, "planned_steps": self.total_steps,
               "stopped_early": res.stopped_early, "stop_reason": res.stop_reason, "bad_steps": res.bad_steps,
               "best_val_loss": self.best_val, "best_step": self.best_step, "tokens_per_s": res.tokens_per_s,
               "train_tokens": self.train_tokens, "train_seconds": self.times["train"],
               "validate_seconds": self.times["validate"], "checkpoint_seconds": self.times["checkpoint"],
               "peak_memory": peak_memory(self.device), "wall_seconds": time.perf_counter() - self.t_start,
               "load_seconds": self.times["load"], "eval_seconds": self.times["eval"],
               "cpu_seconds": time.process_time() - self.cpu_start, "threads": torch.get_num_threads(),
               "patch_parity": self.parity.as_dict() if self.parity else None, "mode": cfg.mode,  # issue 19:
               "optimizer": self.opt_runs, "optimizer_state_bytes": op.state_bytes(self.opt),
               "trainable_params": sum(p.numel() for p in self.params), "saved_bytes": md.dir_bytes(res.adapter_dir),
               "train_cpu_seconds": self.times["train_cpu"]}
        res.report_path = rp.write_outputs(self.out, self.metrics.read(), cfg=cfg.to_dict(), data_md=self.data_md,
                                           before=self.before, after=res.after, probe=res.probe, run=run,
                                           adapter_dir=res.adapter_dir, quiet=self.quiet)
        return res

    def cleanup(self) -> None:
        if getattr(self, "lock_fd", None) is not None:  # the output_dir's lock (`outdir.claim_run_dir`)
            os.close(self.lock_fd)
            self.lock_fd = None
        if getattr(self, "world", 1) > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(cfg: TrainConfig, *, resume: bool = False, quiet: bool = False, overwrite: bool = False,
          allow_config_change: bool = False) -> TrainResult:
    """Run one SFT job end to end (setup, train, final evaluation and report). Returns the TrainResult."""
    t = Trainer(cfg, resume=resume, quiet=quiet, overwrite=overwrite, allow_config_change=allow_config_change)
    try:
        t.setup()
        t.train()
        res = t.finish()
    finally:
        t.cleanup()
    if res.stop_reason:  # after the adapter and the report are written: a diverged run must not look like a success
        raise DivergedError(f"{res.stop_reason}. Adapter: {cfg.output_dir}/adapter; report: {res.report_path}")
    return res
