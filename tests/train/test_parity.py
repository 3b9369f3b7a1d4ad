"""The patch-parity guard (sftfuse.train.parity): the patched model against plain PyTorch on the first batch.

The direct tests build what `sftfuse train` builds, at tiny size: a 2-layer Llama (hidden 64), LoRA r=4 on every
linear layer, an NF4 base or a dense one, and a packed batch of two rows with two documents each (the 4-D document
mask the trainer uses). lora_B starts random, not zero, so that every adapter gradient (A's too) is exercised.
A sabotaged op shows the guard is not vacuous: scaled by 1.01 in fp32 (table: 1e-5) and by 1.25 in bf16 (PyTorch's
own bf16 error on this model is about 1%); the trainer tests run `train()` with the guard on and off.
"""

from __future__ import annotations

import json

import pytest
import torch

from sftfuse.modules.linear import LoRALinear
from sftfuse.modules.quantize import quantize_model
from sftfuse.ops import cross_entropy as ce_op
from sftfuse.ops import lora as lora_op
from sftfuse.ops import lora_mlp as mlp_op
from sftfuse.patch.patcher import is_patched, patch_model
from sftfuse.train.adapter import inject_lora
from sftfuse.train.config import ALL_LINEAR, load_config
from sftfuse.train.data import collate
from sftfuse.train.models import tiny_model
from sftfuse.train.parity import PatchParityError, check_patch_parity
from sftfuse.train.trainer import train
from tests.train.common import _overrides

CASES = [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False), (torch.bfloat16, True)]


def _model(dtype: torch.dtype, nf4: bool, *, dropout: float = 0.0, **patch_options):
    model = tiny_model("llama", attn="sdpa").to(dtype)
    if nf4:
        quantize_model(model, compute_dtype=dtype)
    inject_lora(model, target_modules=ALL_LINEAR, r=4, lora_alpha=8, lora_dropout=dropout)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.02)
    patch_model(model, **patch_options)
    return model.train()


def _batch(model, dtype: torch.dtype) -> dict:
    """Two packed rows of two documents each (prompt tokens unlabelled), and a third row without any label."""
    vocab = model.config.vocab_size

    def row(n: int, labelled: bool) -> dict:
        ids, half = torch.randint(0, vocab, (n,)).tolist(), n // 2
        return {"input_ids": ids, "labels": [-100] * 5 + ids[5:] if labelled else [-100] * n,
                "doc_ids": [0] * half + [1] * (n - half), "position_ids": list(range(half)) + list(range(n - half))}

    return collate([row(40, True), row(33, True), row(20, False)], pad_id=0, packed=True, mask_dtype=dtype)


def _scaled(fn, factor: float):
    def wrapped(*args, **kwargs):
        return fn(*args, **kwargs) * factor

    return wrapped


class _GradScale(torch.autograd.Function):
    """Identity forward; the backward scales the gradient: a kernel whose loss is right and gradient wrong."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        return dy * ctx.factor, None


@pytest.mark.parametrize(("dtype", "nf4"), CASES)
def test_real_kernels_pass_and_leave_the_model_as_it_was(dtype, nf4):
    """Every adapter gradient is compared; after the check the model is patched again, in training mode, with the
    same parameters, dtypes and gradients (none, as the trainer calls it, or a caller's) and torch's RNG as it was."""
    model = _model(dtype, nf4)
    batch = _batch(model, dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    held = model.model.layers[0].mlp.up_proj.lora_A
    held.grad = kept = torch.randn_like(held)
    rng = torch.get_rng_state()
    lines = []
    res = check_patch_parity(model, batch, rows=2, log=lines.append)
    assert res is not None and res.n_grads == 2 * 7 * 2 and res.n_groups == 14
    # with a margin: fp32 errors are ~5e-7 against 2e-5; in bf16 ours equals PyTorch's own e, and e / (2e + tol) < 0.5
    assert res.ratio < (0.1 if dtype == torch.float32 else 0.5)
    assert res.rows == 2 and res.tokens == 35 + 28  # the two labelled rows, not the unlabelled third
    assert res.dtype == str(dtype).removeprefix("torch.") and res.torch_grad_err > 0
    assert res.ref_dtype == ("float64" if dtype == torch.float32 else "float32")
    assert len(lines) == 1
    assert lines[0].startswith("patch parity: loss and 28 gradients of trained weights (14 groups) within")
    assert is_patched(model) and model.training
    assert held.grad is kept and all(p.grad is None for p in model.parameters() if p is not held)
    for n, p in model.named_parameters():
        assert p.dtype == before[n].dtype and torch.equal(p, before[n]), n
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, LoRALinear))


def test_dropout_is_off_during_the_check_and_restored():
    """The fused LoRA path draws its dropout masks differently from torch: the check must run without dropout."""
    model = _model(torch.float32, False, dropout=0.3)
    assert check_patch_parity(model, _batch(model, torch.float32)).ratio <= 1.0
    assert {m.lora_dropout for m in model.modules() if isinstance(m, LoRALinear)} == {0.3}


@pytest.mark.parametrize(("dtype", "factor"), [(torch.float32, 1.01), (torch.bfloat16, 1.25)])
def test_a_wrong_loss_stops_the_run(monkeypatch, dtype, factor):
    model = _model(dtype, True)
    monkeypatch.setattr(ce_op, "linear_cross_entropy", _scaled(ce_op.linear_cross_entropy, factor))
    with pytest.raises(PatchParityError) as e:
        check_patch_parity(model, _batch(model, dtype))
    msg = str(e.value)
    assert "patch parity check failed on the first batch" in msg and "tolerance" in msg
    assert "patch=false" in msg and "verify_patch=false" in msg
    assert is_patched(model) and all(p.grad is None for p in model.parameters())


def test_a_wrong_gradient_with_a_right_loss_is_named(monkeypatch):
    """lora_mlp's output gradient scaled by 1.01: the loss agrees, the adapters below the MLPs do not."""
    model = _model(torch.float32, True)
    lora_mlp = mlp_op.lora_mlp
    monkeypatch.setattr(mlp_op, "lora_mlp", lambda x, *a, **k: lora_mlp(_GradScale.apply(x, 1.01), *a, **k))
    with pytest.raises(PatchParityError, match=r"the gradients model\.layers\.\*\.\S+\.lora_[AB] differ"):
        check_patch_parity(model, _batch(model, torch.float32))


@pytest.mark.parametrize("nf4", [False, True])
def test_sftfuse_lora_layers_are_checked_against_plain_pytorch(monkeypatch, nf4):
    """LoRALinear runs lora_linear patched or not (here every projection does: no MLP swap): the reference pass
    must compute without it, or a wrong lora_linear (output scaled by 1.01) would be its own reference."""
    model = _model(torch.float32, nf4, mlp=False)
    monkeypatch.setattr(lora_op, "lora_linear", _scaled(lora_op.lora_linear, 1.01))
    with pytest.raises(PatchParityError):
        check_patch_parity(model, _batch(model, torch.float32), patch_options={"mlp": False})
    monkeypatch.undo()
    assert check_patch_parity(model, _batch(model, torch.float32), patch_options={"mlp": False}).ratio <= 1.0


def test_the_runs_rng_stream_is_untouched():
    """Whatever the passes draw (here a hook on every decoder layer), torch's RNG ends where it started, so that a
    resumed run, which checks again, draws what an uninterrupted one draws."""
    model = _model(torch.float32, False)
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda module, args: torch.rand(1) and None)
    batch = _batch(model, torch.float32)
    rng = torch.get_rng_state()
    check_patch_parity(model, batch)
    assert torch.equal(torch.get_rng_state(), rng)


def test_rows_are_cut_to_max_tokens():
    """Only the first `max_tokens` positions count (labels at 5..19 of each row: 15 each), and the 4-D document
    masks are cut with the rows, or the model would refuse the batch."""
    model = _model(torch.float32, True)
    res = check_patch_parity(model, _batch(model, torch.float32), rows=3, max_tokens=20)
    assert res.rows == 2 and res.tokens == 30 and res.ratio <= 1.0


def test_nothing_to_compare_without_labels():
    model = _model(torch.float32, False)
    batch = _batch(model, torch.float32)
    batch["labels"][:] = -100
    assert check_patch_parity(model, batch) is None
    assert is_patched(model)


# ---------------------------------------------------------------------------------------------------------------
# through the trainer


def _results(out) -> dict:
    return json.loads((out / "results.json").read_text())["run"]


def test_train_checks_the_patch_on_the_first_batch(tiny_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = load_config(None, _overrides(tiny_dir, data_dir, out, patch=True, max_steps=2, eval_interval=0,
                                       checkpoint_interval=0))
    train(cfg)
    err = capsys.readouterr().err
    assert err.count("patch parity: loss and 28 gradients of trained weights (14 groups) within") == 1
    parity = _results(out)["patch_parity"]
    assert parity["n_grads"] == 28 and parity["ratio"] <= 1.0 and parity["dtype"] == "float32"


def test_cli_stops_on_a_mismatch_with_one_line_unless_told_not_to_check(tiny_dir, data_dir, tmp_path, monkeypatch,
                                                                          capsys):
    from sftfuse.train import cli

    monkeypatch.setattr(ce_op, "linear_cross_entropy", _scaled(ce_op.linear_cross_entropy, 1.01))
    opts = {"patch": True, "max_steps": 1, "eval_interval": 0, "checkpoint_interval": 0}
    assert cli.main(["train", *_overrides(tiny_dir, data_dir, tmp_path / "a", **opts)]) == 1
    err = capsys.readouterr().err
    assert "error: patch parity check failed on the first batch (float32, 1 row(s)" in err and "the loss is" in err
    assert "verify_patch=false" in err and "Traceback" not in err
    assert not (tmp_path / "a" / "results.json").exists()
    assert cli.main(["train", *_overrides(tiny_dir, data_dir, tmp_path / "b", verify_patch=False, **opts)]) == 0
    assert _results(tmp_path / "b")["steps"] == 1 and _results(tmp_path / "b")["patch_parity"] is None


def test_the_check_leaves_no_trace_in_training(tiny_dir, data_dir, tmp_path):
    """With LoRA dropout on (the run draws masks from torch's RNG) the losses of every step, validation included,
    are the same with the check as without it: no RNG drawn, no gradient, no parameter or patch left changed."""
    opts = {"patch": True, "lora_dropout": 0.1, "max_steps": 3, "eval_interval": 3, "checkpoint_interval": 0}
    runs = [train(load_config(None, _overrides(tiny_dir, data_dir, tmp_path / str(v), verify_patch=v, **opts)),
                  quiet=True) for v in (True, False)]
    assert runs[0].losses == runs[1].losses and runs[0].val_losses == runs[1].val_losses
    assert _results(tmp_path / "True")["patch_parity"] is not None
