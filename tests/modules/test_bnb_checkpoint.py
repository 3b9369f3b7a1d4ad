"""`load_4bit_checkpoint`: directories transformers saved from a bitsandbytes 4-bit model load into NF4Linear without
bitsandbytes, to bitsandbytes' outputs.

Oracles: bitsandbytes itself (its `dequantize_4bit` and its model's forward, on real checkpoints that transformers
quantized and saved on CPU), and an independent decode of the on-disk bytes written here from the documented
format (`_decode`). bitsandbytes 0.50.2's CPU `dequantize_4bit` returned wrong values for a few tiny shapes
(8 x 16, 4 x 32) in our runs while its quantizer's bytes decode correctly, so the grid's shapes are ones it
decodes right, and the byte-level decode is checked everywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftfuse.modules.bnb_checkpoint import is_4bit_checkpoint, load_4bit_checkpoint
from sftfuse.modules.linear import NF4Linear
from sftfuse.train.models import tiny_model
from tests.helpers import assert_close, randn

bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")
ROOT = Path(__file__).resolve().parents[2]
QS = ".quant_state.bitsandbytes__nf4"


def _decode(sd: dict, key: str) -> torch.Tensor:
    """fp32 weight of `key` from the stored bytes: code[nibble] * absmax[block], absmax maybe double-quantized."""
    meta = json.loads(bytes(sd[key + QS].tolist()))
    out_f, in_f = meta["shape"]
    n, bs = out_f * in_f, meta["blocksize"]
    packed = sd[key].reshape(-1).view(torch.uint8).long()
    idx = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[:n]
    absmax = sd[key + ".absmax"]
    if key + ".nested_absmax" in sd:
        nested = sd[key + ".nested_absmax"].float().repeat_interleave(256)[: absmax.numel()]
        absmax = sd[key + ".nested_quant_map"][absmax.long()] * nested + meta["nested_offset"]
    return (sd[key + ".quant_map"][idx] * absmax.float().repeat_interleave(bs)[:n]).reshape(out_f, in_f)


def _bnb_dir(tmp_path: Path, family: str, *, double_quant: bool, compute: torch.dtype, quant_type="nf4"):
    """A tiny model quantized by transformers + bitsandbytes on CPU and saved: the `*-bnb-4bit` layout. Returns
    (dir, the bitsandbytes model in train mode: its eval-mode CPU path repacks weights for shapes it tiles)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model(family).save_pretrained(tmp_path / "fp")
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_use_double_quant=double_quant)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=qcfg, device_map="cpu")
    model.save_pretrained(tmp_path / "q")
    return tmp_path / "q", model.train()


# Both families the loader must handle: Llama (untied head) and Gemma-2 (tied head, dropped from the file by
# transformers); double quantization on and off; fp32 compute (exact) and bf16 compute (bitsandbytes' default in
# the downloaded checkpoints).
@pytest.mark.parametrize("family,double_quant,compute", [
    ("llama", True, torch.float32), ("llama", False, torch.bfloat16),
    ("gemma2", True, torch.bfloat16), ("gemma2", False, torch.float32)])
def test_real_checkpoint_matches_bitsandbytes(tmp_path, family, double_quant, compute):
    path, ref = _bnb_dir(tmp_path, family, double_quant=double_quant, compute=compute)
    assert is_4bit_checkpoint(path) and not is_4bit_checkpoint(tmp_path / "fp")
    model = load_4bit_checkpoint(path)
    assert model.config.model_type == family and not hasattr(model.config, "quantization_config")
    sd = load_file(str(path / "model.safetensors"))
    quantized = sorted(k[: -len(QS)] for k in sd if k.endswith(QS))
    assert len(quantized) == 14  # 2 layers x 7 projections; the head stays 16/32-bit as bitsandbytes leaves it
    for key in quantized:
        name = key.removesuffix(".weight")
        ours, theirs = model.get_submodule(name), ref.get_submodule(name)
        assert isinstance(ours, NF4Linear) and ours.compute_dtype == compute
        w = ours.quant
        assert torch.equal(ours.dequantize().float(), _decode(sd, key).to(compute).float()), key
        assert torch.equal(bnbF.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state).float(),
                           _decode(sd, key)), key
        assert (w.nested_absmax is not None) == double_quant and w.blocksize == 64
    ids = torch.randint(0, 1000, (2, 13))
    with torch.no_grad():
        out, bnb_out = model(ids).logits, ref(ids).logits
    if compute == torch.float32:  # the same fp32 weights through the same GEMM: equal up to summation order
        torch.testing.assert_close(out, bnb_out, rtol=1e-5, atol=1e-5)
    else:  # bf16 GEMMs on both sides: ours may be no further from the fp64 answer than twice bitsandbytes'
        twin = tiny_model(family, dtype=torch.float64)
        with torch.no_grad():
            for key in quantized:
                twin.get_submodule(key.removesuffix(".weight")).weight.copy_(_decode(sd, key))
            ref64 = twin(ids).logits
        assert_close(out, ref64, dtype=torch.bfloat16, baseline=bnb_out)


# Shapes: 20 x 37 (odd numel: a half-used last byte and a partial last block), 70 x 130 (several blocks, a partial
# last one), 1 x 7 (less than one block). Blocksizes over bitsandbytes' range; quant_storage uint8 (the default)
# and bf16 (the packed bytes viewed as bf16 pairs, as transformers saves with bnb_4bit_quant_storage=bfloat16).
@pytest.mark.parametrize("shape", [(20, 37), (70, 130), (1, 7)])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_bitsandbytes_quant_states_load(shape, blocksize, double_quant, storage):
    w = randn(*shape)
    packed, qs = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4",
                                    quant_storage=storage)
    sd = {"weight": packed, **{f"weight.{k}": v for k, v in qs.as_dict(packed=True).items()}}
    m = NF4Linear(shape[1], shape[0], bias=False, compute_dtype=torch.float32)  # default layout: replaced
    result = m.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    assert m.blocksize == blocksize and (m.nested_absmax is not None) == double_quant
    expected = _decode(sd, "weight")
    assert torch.equal(m.dequantize(), expected)
    assert torch.equal(bnbF.dequantize_4bit(packed, qs), expected)
    x = randn(3, shape[1])
    assert_close(m(x), x.double() @ expected.double().t())


def test_loads_with_bitsandbytes_unimportable(tmp_path):
    """In a process where `import bitsandbytes` fails (a stand-in package that raises and leaves a mark), the
    checkpoint loads and gives bitsandbytes' logits; nothing tried to import it."""
    path, ref = _bnb_dir(tmp_path, "llama", double_quant=True, compute=torch.float32)
    fake = tmp_path / "fake" / "bitsandbytes"
    fake.mkdir(parents=True)
    mark = tmp_path / "imported"
    (fake / "__init__.py").write_text(f"open({str(mark)!r}, 'w').close()\n"
                                      "raise ImportError('bitsandbytes is not installed')\n")
    ids = torch.randint(0, 1000, (2, 11))
    torch.save(ids, tmp_path / "ids.pt")
    script = ("import sys, torch, sftfuse\n"
              f"m = sftfuse.load_4bit_checkpoint({str(path)!r})\n"
              f"with torch.no_grad(): torch.save(m(torch.load({str(tmp_path / 'ids.pt')!r})).logits, "
              f"{str(tmp_path / 'out.pt')!r})\n"
              "assert 'bitsandbytes' not in sys.modules\n")
    env = {"PYTHONPATH": f"{fake.parent}:{ROOT}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not mark.exists()
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "out.pt"), ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_refuses_what_it_cannot_read(tmp_path):
    path, _ = _bnb_dir(tmp_path, "llama", double_quant=False, compute=torch.float32, quant_type="fp4")
    with pytest.raises(ValueError, match="bnb_4bit_quant_type='fp4'.*NF4 checkpoints only"):
        load_4bit_checkpoint(path)
    with pytest.raises(ValueError, match="not a bitsandbytes 4-bit checkpoint"):
        load_4bit_checkpoint(tmp_path / "fp")
    cfg = json.loads((tmp_path / "fp" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (tmp_path / "fp" / "config.json").write_text(json.dumps(cfg))
    assert not is_4bit_checkpoint(tmp_path / "fp")
    with pytest.raises(ValueError, match="not a bitsandbytes 4-bit checkpoint"):
        load_4bit_checkpoint(tmp_path / "fp")
