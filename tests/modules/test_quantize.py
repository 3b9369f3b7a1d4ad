"""NF4Linear and quantize_model: bitsandbytes-keyed save/load, Linear4bit state dicts, whole tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sftfuse.kernels.nf4 import dequantize_nf4, quantize_nf4
from sftfuse.modules.linear import NF4Linear
from sftfuse.modules.quantize import load_nf4_checkpoint, nf4_linear_from_bnb, nf4_weight_from_bnb, quantize_model
from sftfuse.train.models import tiny_model
from tests.helpers import assert_close, randn

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except Exception:  # noqa: BLE001 - any failure to import the optional oracle means: skip
    bnb = bnbF = None

needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes (optional test dependency) is not installed")
KEYS = {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4"}


def _linear(k, n, bias=True):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(randn(n, k, scale=0.05))
        if bias:
            lin.bias.copy_(randn(n, scale=0.1))
    return lin


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4linear_safetensors_round_trip(tmp_path, double_quant):
    """(37 -> 20): odd numel, a partial last block. Saved keys are bitsandbytes'; reload is bit-identical."""
    m = NF4Linear.from_linear(_linear(37, 20), double_quant=double_quant, compute_dtype=torch.float32)
    sd = m.state_dict()
    expected = KEYS | {"bias"} if double_quant else (KEYS - {"weight.nested_absmax", "weight.nested_quant_map"}) | {
        "bias"}
    assert set(sd) == expected
    assert sd["weight"].shape == ((37 * 20 + 1) // 2, 1) and sd["weight"].dtype == torch.uint8
    meta = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["quant_type"] == "nf4" and meta["blocksize"] == 64 and meta["shape"] == [20, 37]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    m2 = NF4Linear(37, 20, double_quant=not double_quant, compute_dtype=torch.float32)  # other layout: replaced
    result = m2.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(m2.dequantize(), m.dequantize()) and torch.equal(m2.bias, m.bias)
    x = randn(3, 37)
    assert torch.equal(m2(x), m(x))


@needs_bnb
def test_bnb_linear4bit_state_dict_loads_into_nf4linear(tmp_path):
    """A Linear4bit (NF4, double quant) quantized by bitsandbytes on CPU, saved to safetensors, loads and runs."""
    lin = bnb.nn.Linear4bit(130, 70, bias=True, quant_type="nf4", compress_statistics=True,
                            compute_dtype=torch.float32)
    with torch.no_grad():
        lin.weight.data.copy_(randn(70, 130))
        lin.bias.copy_(randn(70))
    lin = lin.to("cpu")  # bitsandbytes quantizes on the device move
    save_file({k: v.contiguous() for k, v in lin.state_dict().items()}, str(tmp_path / "b.safetensors"))
    m = NF4Linear(130, 70, compute_dtype=torch.float32)
    m.load_state_dict(load_file(str(tmp_path / "b.safetensors")))
    ref_w = bnbF.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    assert torch.equal(m.dequantize(), ref_w)
    x = randn(5, 130)
    assert_close(m(x), (x.double() @ ref_w.double().t() + lin.bias.double()))
    # and back: what NF4Linear saves is what bitsandbytes saved
    ours = m.state_dict()
    for k, v in lin.state_dict().items():
        if k != "weight.quant_state.bitsandbytes__nf4":
            assert torch.equal(ours[k], v), k
    assert json.loads(bytes(ours["weight.quant_state.bitsandbytes__nf4"].tolist())) == json.loads(
        bytes(lin.state_dict()["weight.quant_state.bitsandbytes__nf4"].tolist()))


@needs_bnb
def test_nf4_weight_from_bnb_shares_storage():
    lin = bnb.nn.Linear4bit(64, 48, bias=False, quant_type="nf4", compress_statistics=True).to("cpu")
    q = nf4_weight_from_bnb(lin.weight)
    assert q.packed.data_ptr() == lin.weight.data.data_ptr()
    assert torch.equal(dequantize_nf4(q, torch.float32), bnbF.dequantize_4bit(lin.weight.data, lin.weight.quant_state))
    m = nf4_linear_from_bnb(lin)
    assert m.weight.data_ptr() == lin.weight.data.data_ptr()
    x = randn(3, 64)
    assert torch.equal(m(x), torch.nn.functional.linear(x.to(m.compute_dtype), m.dequantize()).to(x.dtype))
    fp4 = bnb.nn.Linear4bit(64, 48, bias=False, quant_type="fp4").to("cpu")
    with pytest.raises(ValueError, match="nf4"):
        nf4_weight_from_bnb(fp4.weight)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_quantize_model_tiny(family):
    """Every linear but lm_head becomes NF4Linear and its 16-bit weight is released; the logits equal those of
    the original model with each weight replaced by its dequantized NF4 copy, and stay near the original's."""
    model = tiny_model(family)
    twin = tiny_model(family)  # same seed: the same weights
    ids = torch.randint(0, 1000, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
        for name, lin in twin.named_modules():
            if isinstance(lin, nn.Linear) and name != "lm_head":
                lin.weight.copy_(dequantize_nf4(quantize_nf4(lin.weight), torch.float32))
        ref_nf4 = twin(ids).logits
    old = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantize_model(model, compute_dtype=torch.float32)
    new = dict(model.named_modules())
    for name, lin in old.items():
        if name == "lm_head":
            assert new[name] is lin and lin.weight.numel() > 0
        else:
            assert isinstance(new[name], NF4Linear)
            assert lin.weight.numel() == 0  # storage freed as it went
    with torch.no_grad():
        out = model(ids).logits
    assert_close(out, ref_nf4.double(), dtype=torch.float32)
    # NF4's relative RMS error on Gaussian weights is about 0.1; measured 0.10-0.12 over seeds on these models
    assert (out - ref).norm() <= 0.2 * ref.norm()


def test_quantized_checkpoint_round_trip(tmp_path):
    """quantize_model -> state_dict (bitsandbytes keys) -> safetensors -> a fresh model built from the config."""
    model = quantize_model(tiny_model("llama"), compute_dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    fresh = tiny_model("llama", seed=1)
    load_nf4_checkpoint(fresh, tmp_path, compute_dtype=torch.float32)
    assert isinstance(fresh.model.layers[1].self_attn.o_proj, NF4Linear)
    ids = torch.randint(0, 1000, (1, 7))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_nf4linear_is_an_nn_linear_that_is_never_requantized():
    """NF4Linear subclasses nn.Linear (PEFT's dispatch and "all-linear" see a linear layer), but its packed bytes
    are not a weight to quantize again: from_linear refuses it and quantize_model leaves it as it is."""
    m = NF4Linear.from_linear(_linear(64, 24), compute_dtype=torch.float32)
    assert isinstance(m, nn.Linear) and m.weight.dtype == torch.uint8
    with pytest.raises(TypeError, match="linear: expected a 16/32-bit nn.Linear, got NF4Linear"):
        NF4Linear.from_linear(m)
    seq = nn.Sequential(m, nn.Linear(24, 8))
    quantize_model(seq, compute_dtype=torch.float32)
    assert seq[0] is m and isinstance(seq[1], NF4Linear)


def test_nf4linear_trains_through_input_and_bias():
    m = NF4Linear.from_linear(_linear(96, 40), compute_dtype=torch.float32)
    m.bias.requires_grad_(True)
    x = randn(4, 96, requires_grad=True)
    dy = randn(4, 40)
    dx, db = torch.autograd.grad(m(x), [x, m.bias], dy)
    w = m.dequantize().double()
    assert_close(dx, dy.double() @ w)
    assert_close(db, dy.double().sum(0))


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4linear_dtype_cast_keeps_quant_state(double_quant):
    """model.to(bf16) casts biases and the compute dtype but must leave the fp32 scales and code books exact; a
    device-only move keeps the compute dtype."""
    m = NF4Linear.from_linear(_linear(64, 24), double_quant=double_quant, compute_dtype=torch.float32)
    before = m.dequantize()
    m.to(torch.bfloat16)
    assert m.quant_map.dtype == torch.float32 and m.bias.dtype == torch.bfloat16
    assert m.compute_dtype == torch.bfloat16 and m.dequantize().dtype == torch.bfloat16
    assert torch.equal(dequantize_nf4(m.quant, torch.float32), before)
    m.to("cpu")
    assert m.compute_dtype == torch.bfloat16
    m.float()
    assert m.compute_dtype == torch.float32 and torch.equal(m.dequantize(), before)
