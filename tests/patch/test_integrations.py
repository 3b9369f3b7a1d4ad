"""patch_model under the trainers people use: HF Trainer, TRL SFTTrainer, DDP and FSDP2 (same losses and gradients
as the unpatched model)."""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
from torch import nn

from sftfuse.ops import cross_entropy, lora
from sftfuse.patch.patcher import is_patched, patch_model, unpatch_model
from tests.patch.common import (
    VOCAB,
    count_calls,
    lora_model,
    max_diff,
    sft_batch,
)

# ---------------------------------------------------------------------------------------------------------------
# HF Trainer and TRL SFTTrainer
# ---------------------------------------------------------------------------------------------------------------


def test_hf_trainer_same_losses(tmp_path, monkeypatch):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    rows = [{k: v[i].tolist() for k, v in sft_batch(seed=s).items()} for s in range(6) for i in range(2)]
    ds = Dataset.from_list(rows)
    calls = count_calls(monkeypatch, "linear_cross_entropy", cross_entropy)
    losses = []
    for patched in (False, True):
        model = lora_model("llama")
        if patched:
            patch_model(model)
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                 max_steps=3, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True,
                                 save_strategy="no", seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=ds)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses[0]) == 3
    assert len(calls) == 6 and all(n is not None for n in calls)  # 3 steps x 2 micro-batches, Trainer's token count
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-5)


def word_tokenizer():
    """A word-level tokenizer over the tiny vocabulary: "w17 w3" -> [17, 3]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 3)} | {"<unk>": VOCAB - 3, "<pad>": VOCAB - 2, "</s>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def test_trl_sft_trainer_same_losses(tmp_path, monkeypatch):
    """TRL 1.16 computes the SFT loss with its own fused head; our LoRA swap runs underneath it."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)

    def words(n):
        return " ".join(f"w{i}" for i in torch.randint(0, VOCAB - 3, (n,), generator=g).tolist())

    ds = Dataset.from_list([{"prompt": words(6 + i % 5), "completion": words(8 + i % 3)} for i in range(12)])
    calls = count_calls(monkeypatch, "lora_linear", lora)
    losses = []
    for patched in (False, True):
        model = lora_model("qwen3")
        if patched:
            patch_model(model)
        args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=3, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", seed=0, max_length=32, bf16=False)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=word_tokenizer())
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
        if patched:  # TRL wrapped our forward with its fused head: unpatching switches ours off underneath
            unpatch_model(model)
            assert not any(is_patched(m) for m in model.modules())
    assert len(losses[0]) == 3 and len(calls) >= 3 * 2 * 14  # steps x micro-batches x LoRA layers
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------------------------


def _dist_worker(rank: int, world: int, port: int, out: str, kind: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # a bounded timeout: a rank that fails makes the other raise instead of waiting in a collective forever
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        model = lora_model("llama")
        if kind == "ddp":
            patch_model(model)
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:  # FSDP2 with the lm_head sharded on its own: its weight exists whole only inside its own forward
            from torch.distributed.fsdp import fully_shard

            inner = model.get_base_model()
            for layer in [*inner.model.layers, inner.lm_head]:
                fully_shard(layer)
            wrapped = fully_shard(model)
            assert patch_model(model, strict=True).family == "llama"  # patched after sharding
        full = sft_batch((5, 9, 14, 3), pad=3)
        n_items = torch.tensor(int((full["labels"][:, 1:] != -100).sum()))
        part = {k: v.chunk(world)[rank] for k, v in full.items()}
        out_ = wrapped(**part, num_items_in_batch=n_items)
        assert out_.logits is None
        # every rank divides by the global token count; DDP and FSDP average, so scale by world (as HF Trainer does)
        (out_.loss * world).backward()
        grads = {n.replace("_fsdp_wrapped_module.", ""): p.grad.full_tensor() if hasattr(p.grad, "full_tensor")
                 else p.grad for n, p in model.named_parameters() if p.requires_grad}
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: a worker was seen to hang (or abort) there, in the destructors of gloo's process
    # group or DDP's reducer, after its work was done and saved (faulthandler: no Python frame left but the caller).
    os._exit(0)


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_distributed_gradients_equal_single_process(kind, tmp_path):
    import socket
    import subprocess
    import sys

    import torch.multiprocessing as mp

    if os.environ.get("SFTFUSE_TEST_ISOLATED") != "1":
        # Run in a fresh interpreter: in full-suite runs, gloo workers spawned from this process (after the Trainer
        # and TRL tests) were seen to hang in rendezvous, while the same test alone always passed.
        # A gloo worker was also seen to abort once in teardown ("terminate called without an active exception"),
        # so a crashed run gets one more try; a wrong gradient fails both.
        node = f"{__file__}::test_distributed_gradients_equal_single_process[{kind}]"
        for _ in range(2):
            p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node], check=False,
                               env={**os.environ, "SFTFUSE_TEST_ISOLATED": "1"}, capture_output=True, text=True,
                               timeout=600)
            if p.returncode == 0 and "1 passed" in p.stdout:
                return
        raise AssertionError(p.stdout[-3000:] + p.stderr[-2000:])

    out = str(tmp_path / "grads.pt")
    # Once in a full-suite run the two gloo workers never met (a port picked by bind-and-release is free again for
    # anyone until gloo binds it). A rendezvous that hangs is not what this test checks: retry once on a new port.
    for attempt in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.start_processes(_dist_worker, args=(2, port, out, kind), nprocs=2, join=False, start_method="spawn")
        deadline = time.monotonic() + 200
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.terminate()
                break
        else:
            break
        if attempt == 1:
            pytest.fail(f"{kind} workers still running after 200 s, twice")
    dist_grads = torch.load(out)
    model = lora_model("llama")
    model(**sft_batch((5, 9, 14, 3), pad=3)).loss.backward()  # unpatched, whole batch, one process
    ref = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert dist_grads.keys() == ref.keys()
    assert max_diff(dist_grads, ref) < 1e-5 * max(g.abs().max().item() for g in ref.values()) + 1e-7
