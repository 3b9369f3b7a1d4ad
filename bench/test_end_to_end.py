"""End-to-end SFT step on the default model: HF + PEFT against the same model patched by sftfuse.

SmolLM2-135M-Instruct (Llama: hidden 576, 30 layers, vocab 49152, tied embeddings), batch 4 x 256 tokens with
the first half of every row a prompt (labels -100), AdamW over the adapters, CPU, LoRA dropout 0.05 on every
adapter (the issue's setting: dropout is where a CPU LoRA step spends its non-GEMM time). Configurations:
  a  HF + PEFT LoRA r=16 on all linears, bf16 base (PEFT keeps fp32 adapters): the baseline
  b  a, patched by sftfuse (fused LoRA in bf16, fused linear + cross-entropy: no logits)
  c  HF + PEFT LoRA over bitsandbytes NF4 Linear4bit (bf16 compute), if bitsandbytes runs on this CPU
  d  sftfuse QLoRA: quantize_model (NF4, double quant) + sftfuse LoRALinear + patch_model; `gc` adds gradient
     checkpointing (non-reentrant), reported as its own row
Each configuration runs in its own process (`python bench/test_end_to_end.py CONFIG`), so one's allocator state
and peak never leak into another's. FLOPs of a LoRA step: about 4 x params x tokens (forward, and backward to
the inputs; frozen weights get no gradient): 4 x 135e6 x 1024 = 0.55 TFLOP, reported as GFLOP/s. The FLOP floor
counts what the step must compute: 4 x 106.2 M linear weights x 1,024 tokens, attention (about 54 GFLOP) and the
frozen head on the 512 counted rows (4 x 512 x 576 x 49,152 = 58 GFLOP); "x floor" is the step's time over that
work at this host's best GEMM rate, measured in the same run (bench/conftest.py).

Memory is measured in a second fresh process per configuration, in which glibc returns every block of 64 KiB or
more to the OS on free from the start (`mallopt(M_MMAP_THRESHOLD)` before torch is imported), so the peak is what
the step holds live, not what the heap kept of earlier steps. `model_rss` is the RSS once the model is loaded and
prepared (quantized, adapters added); after one warm-up step (which allocates the optimizer state) the high-water
mark is reset through /proc/self/clear_refs and one more step is run. `peak_above_model` = that step's peak -
model_rss (activations, gradients, optimizer state, workspace); `peak_total` = the peak itself.
Why a separate process: switched on after the timed steps in the timing process, as this file first did, the
threshold did not apply to the free chunks the earlier steps had left in the heap, and large blocks were served
from them and kept resident after their free. The peak then depended on that history: the same code measured
(d) at 1,090-1,099 MB total and (a) at 2,696-2,739 MB in three runs each; measured this way, at 860-861 and
2,506-2,507 MB in two runs each.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import statistics
import sys
import time

import pytest

BATCH, SEQ, RANK, DROPOUT = 4, 256, 16, 0.05
TOKENS = BATCH * SEQ
STEP_FLOP = 4 * 135e6 * TOKENS
FLOOR_FLOP = 4 * 106.2e6 * TOKENS + 54e9 + 4 * (TOKENS // 2) * 576 * 49152  # linears, attention, counted head
CONFIGS = {
    "a": "HF + PEFT LoRA r=16, bf16",
    "b": "a + sftfuse.patch_model",
    "c": "HF + PEFT LoRA over bitsandbytes NF4",
    "d": "sftfuse QLoRA (quantize_model + LoRALinear + patch_model)",
    "d+gc": "d + gradient checkpointing",
}


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _batch():
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[:, : SEQ // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _build(config: str):
    import torch

    from sftfuse.train.models import load_default_model

    bf16 = torch.bfloat16
    if config in ("a", "b"):
        import peft

        model, _ = load_default_model(dtype=bf16)
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=32, lora_dropout=DROPOUT,
                                                           target_modules="all-linear"))
    elif config == "c":
        import peft
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from sftfuse.train.models import cache_dir

        load_default_model(dtype=bf16)  # makes sure the safetensors cache exists
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=bf16)
        model = AutoModelForCausalLM.from_pretrained(cache_dir() / "SmolLM2-135M-Instruct", dtype=bf16,
                                                     quantization_config=qcfg, device_map="cpu")
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=32, lora_dropout=DROPOUT,
                                                           target_modules="all-linear"))
    else:
        from sftfuse.modules.linear import LoRALinear, NF4Linear
        from sftfuse.modules.quantize import quantize_model

        model, _ = load_default_model(dtype=bf16)
        quantize_model(model, compute_dtype=bf16)
        model.requires_grad_(False)
        for name, module in list(model.named_modules()):
            if isinstance(module, NF4Linear):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child,
                        LoRALinear.from_linear(module, r=RANK, lora_alpha=32, lora_dropout=DROPOUT))
    if config.endswith("+gc"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    report = None
    if config in ("b", "d", "d+gc"):
        from sftfuse.patch.patcher import patch_model

        report = str(patch_model(model, strict=True))
    return model.train(), report


def worker(config: str, steps: int, mode: str = "time") -> dict:
    """Run one configuration in this process; returns its measurements.

    mode "time": one warm-up step, then `steps` timed ones (median reported). mode "memory": one warm-up step,
    then the peak RSS of one more (the caller has set the mmap threshold before importing torch).
    """
    import torch

    libc = ctypes.CDLL("libc.so.6")
    model, report = _build(config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = _batch()
    gc.collect()
    libc.malloc_trim(0)
    model_rss = _status("VmRSS:")

    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    losses = [step()]  # the first step allocates the optimizer state: warm-up
    row = {"config": config, "what": CONFIGS[config], "model_rss_mb": model_rss / 2**20, "loss_first": losses[0],
           "threads": torch.get_num_threads(), "patch_report": report}
    if mode == "memory":
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        step()
        peak = _status("VmHWM:")
        return {**row, "peak_above_model_mb": (peak - model_rss) / 2**20, "peak_total_mb": peak / 2**20}
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    return {**row, "s_per_step": s, "tokens_per_s": TOKENS / s, "gflops": STEP_FLOP / s / 1e9,
            "loss_last": losses[-1], "steps_timed": steps}


# Timed steps per configuration (after one warm-up step) and torch threads (0: torch's default). On a machine that
# other jobs load, BENCH_THREADS=1 avoids OpenMP oversubscription, which slows a step several-fold.
STEPS = int(os.environ.get("BENCH_STEPS", "5"))
THREADS = int(os.environ.get("BENCH_THREADS", "0"))


def interleaved(rounds: int) -> dict:
    """(a) and (b) on one model in one process: each round times one step unpatched and one patched (`patch_model`
    / `unpatch_model` between them, the order swapped every round), so a change of load hits both; returns the
    median step of each and the median of the per-round speed ratios."""
    import torch

    from sftfuse.patch.patcher import patch_model, unpatch_model

    model, _ = _build("a")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = _batch()

    def step(patched: bool) -> float:
        unpatch_model(model)
        if patched:
            patch_model(model, strict=True)
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step(False), step(True)  # warm-up: optimizer state, the CPU plan's measurements
    times = {False: [], True: []}
    for i in range(rounds):
        for patched in ((False, True) if i % 2 == 0 else (True, False)):
            times[patched].append(step(patched))
    ratios = [a / b for a, b in zip(times[False], times[True], strict=True)]
    return {"a_s_per_step": statistics.median(times[False]), "b_s_per_step": statistics.median(times[True]),
            "speed_b_vs_a": statistics.median(ratios), "rounds": rounds, "threads": torch.get_num_threads()}


def _run(config: str, steps: int, mode: str, timeout: int) -> dict:
    from conftest import run_fresh  # here, not at the top: conftest imports torch, and a worker sets mallopt first

    row = run_fresh(__file__, [config, str(steps), str(THREADS), mode], timeout)
    if "error" in row:
        return {"config": config, "what": CONFIGS[config], "error": f"{mode}: {row['error']}"}
    return row


def run_config(config: str, steps: int = STEPS, timeout: int = 900) -> dict:
    """Time `config` in one fresh interpreter and measure its memory in another; returns its row, or
    {"error": ...} when it cannot run here."""
    timed = _run(config, steps, "time", timeout)
    if "error" in timed:
        return timed
    memory = _run(config, steps, "memory", timeout)
    if "error" in memory:
        return memory
    order = ("config", "what", "s_per_step", "tokens_per_s", "gflops", "model_rss_mb", "peak_above_model_mb",
             "peak_total_mb", "loss_first", "loss_last", "steps_timed", "threads", "patch_report")
    merged = {**timed, **{k: memory[k] for k in ("model_rss_mb", "peak_above_model_mb", "peak_total_mb")}}
    return {k: merged[k] for k in order}


_ROWS: dict[str, dict] = {}


def _floor_multiple(seconds: float) -> float:
    """The step's time over its FLOP floor, at this host's best GEMM rate measured with the workers' threads."""
    import torch
    from conftest import x_floor

    if THREADS > 0:
        torch.set_num_threads(THREADS)
    return x_floor(seconds, FLOOR_FLOP)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_end_to_end(config, benchmark, bench_record):
    _floor_multiple(1.0)  # measures the host's GEMM rate before the first configuration runs
    row = benchmark.pedantic(run_config, args=(config,), rounds=1, iterations=1)
    if "error" not in row:
        row["x_floor"] = _floor_multiple(row["s_per_step"])
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "patch_report"})
    base = _ROWS.get("a")
    if base and "error" not in row and "error" not in base:
        row["speed_vs_a"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["mem_above_model_vs_a"] = row["peak_above_model_mb"] / base["peak_above_model_mb"]
        row["total_mem_vs_a"] = row["peak_total_mb"] / base["peak_total_mb"]
    _ROWS[config] = row
    bench_record("end_to_end", {k: v for k, v in row.items() if k != "patch_report"})
    if row.get("patch_report"):
        print(row["patch_report"])


def test_end_to_end_interleaved(bench_record):
    """(b) against (a) with their steps interleaved in one process (see `interleaved`): the ratio to trust on a
    loaded host."""
    row = _run("a", STEPS, "interleaved", 1800)
    if "error" not in row:
        row["b_x_floor"] = _floor_multiple(row["b_s_per_step"])
    bench_record("end_to_end_interleaved", row)


if __name__ == "__main__":
    _mode = sys.argv[4] if len(sys.argv) > 4 else "time"
    if _mode == "memory":  # before torch allocates anything: blocks of 64 KiB or more go back to the OS on free
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    if len(sys.argv) > 3 and int(sys.argv[3]) > 0:
        import torch

        torch.set_num_threads(int(sys.argv[3]))
    _steps = int(sys.argv[2]) if len(sys.argv) > 2 else STEPS
    print(json.dumps(interleaved(_steps) if _mode == "interleaved" else worker(sys.argv[1], _steps, _mode)))
