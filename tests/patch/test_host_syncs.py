"""Host syncs in a patched QLoRA training step on the Triton path (issue 14): none per layer, at most one per loss.

A host sync is an op that makes the CPU wait for the device: reading a value (`_local_scalar_dense`: `.item()`,
`float()`, `int()`), a data-dependent size (`nonzero`) or a truth value (`is_nonzero`). Counted through a
TorchDispatchMode over the forward and backward of one step of a tiny Llama loaded through bitsandbytes' NF4 path
with PEFT LoRA (the QLoRA recipe), patched, with SFTFUSE_BACKEND=triton (the interpreter on a CPU-only host, where
every op is on the CPU: an op counted here is one that would sync on CUDA). The batch has no attention mask, so
transformers' own padding-mask checks (two syncs per forward, outside sftfuse) do not run; lora dropout is 0, so no
dropout seed is drawn (a CPU-generator read, not a device sync). One step warms up first: each 4-bit layer reads
bitsandbytes' offset tensor once, on its first forward, and keeps the float.
"""

from __future__ import annotations

import traceback

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from sftfuse.patch.patcher import patch_model
from tests.patch.common import sft_batch
from tests.patch.test_quantized import bnb_lora_model

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero")


class _Syncs(TorchDispatchMode):
    """Records each host-syncing op with the sftfuse frame that issued it."""

    def __init__(self):
        super().__init__()
        self.hits: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in SYNC_OPS:
            frames = [f for f in traceback.extract_stack() if "/sftfuse/" in f.filename]
            where = f"{frames[-1].filename.rsplit('/sftfuse/', 1)[-1]}:{frames[-1].name}" if frames else "outside"
            self.hits.append((func._schema.name, where))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def step_syncs(tmp_path_factory):
    """Host syncs of one warmed-up patched QLoRA step (forward + backward), on the Triton path."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SFTFUSE_BACKEND", "triton")
    try:
        model = bnb_lora_model("llama", tmp_path_factory.mktemp("qlora"))
        patch_model(model, strict=True)
        batch = sft_batch(pad=0)
        del batch["attention_mask"]
        model(**batch).loss.backward()  # warm-up: first forward of each layer
        with _Syncs() as syncs:
            model(**batch).loss.backward()
    finally:
        mp.undo()
    return syncs.hits


def test_no_host_sync_per_layer(step_syncs):
    """Every sync left comes from the loss (one call per step), none from the 4-bit, LoRA, MLP or norm layers."""
    outside_loss = [h for h in step_syncs if "cross_entropy" not in h[1]]
    assert not outside_loss, outside_loss


def test_at_most_one_host_sync_per_loss_call(step_syncs):
    assert len(step_syncs) <= 1, step_syncs
