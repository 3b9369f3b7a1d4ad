"""`sftfuse export-gguf`: a merged model as one GGUF file, written with the `gguf` package's GGUFWriter.

The file follows llama.cpp's conventions (its convert_hf_to_gguf), so llama.cpp, Ollama, LM Studio and
transformers (`from_pretrained(dir, gguf_file=...)`) read it:

- tensor names from gguf-py's own map (`gguf.get_tensor_name_map(arch, n_layers)`: `model.layers.3.self_attn.q_proj`
  -> `blk.3.attn_q`), each checked against `gguf.MODEL_TENSORS[arch]`; a tied output head is not written (readers
  tie it back when `output.weight` is missing);
- the architecture's metadata keys (`{arch}.block_count`, `.context_length`, `.embedding_length`,
  `.feed_forward_length`, `.attention.head_count[_kv]`, `.attention.key_length`, `.rope.freq_base`,
  `.attention.layer_norm_rms_epsilon`, Gemma-2's softcaps and sliding window);
- the family's tensor conventions: Llama-arch files (Llama, and Mistral, which llama.cpp writes as `llama`) hold
  Q and K with each head's rotary halves interleaved (llama.cpp's rope pairs neighbours, HF's pairs halves), and
  Gemma-2 files hold its RMSNorm weights as 1 + w (HF stores w and computes x * (1 + w));
- 1-D tensors in F32; matrices in F16, BF16 or Q8_0 (`gguf.quants.quantize`; a matrix whose rows are not a whole
  number of 32-value blocks falls back to F16, as llama.cpp does);
- the tokenizer and chat template (`gguf_vocab`).

What transformers' GGUF loader cannot read back (it reads only the keys above): Qwen-3's head_dim (it assumes 128)
and Gemma-2's query_pre_attn_scalar (256) and softcaps (50 / 30); a model that differs is written all the same,
with a warning. Mistral comes back as a LlamaForCausalLM (the same computation without a sliding window).

The file is written beside OUT as `.tmp-<name>-<pid>-<random>`, fsynced and renamed over OUT: a crash leaves OUT as
it was (and debris that the next run removes); an existing OUT is replaced only with `overwrite`.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sftfuse.train import outdir as od

log = logging.getLogger(__name__)

TYPES = ("f16", "bf16", "q8_0")


@dataclass(frozen=True)
class GGUFFamily:
    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # Llama-arch rotary layout
    norm_plus_one: bool = False  # Gemma's RMSNorm weights stored as 1 + w


GGUF_FAMILIES = {
    "llama": GGUFFamily("LLAMA", permute_qk=True),
    "mistral": GGUFFamily("LLAMA", permute_qk=True),
    "qwen2": GGUFFamily("QWEN2"),
    "qwen3": GGUFFamily("QWEN3"),
    "gemma2": GGUFFamily("GEMMA2", norm_plus_one=True),
}


def _family(config) -> GGUFFamily:
    fam = GGUF_FAMILIES.get(config.model_type)
    if fam is None:
        raise ValueError(f"model_type {config.model_type!r}: export-gguf writes {', '.join(GGUF_FAMILIES)}")
    return fam


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if scaling not in ("default", None):
        raise ValueError(f"rope_type {scaling!r}: export-gguf writes unscaled rotary embeddings only")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def _warn_unreadable(config) -> None:
    """Settings transformers' GGUF loader does not read back (module docstring)."""
    if config.model_type == "qwen3" and _head_dim(config) != 128:
        log.warning("qwen3 head_dim %d: transformers' GGUF loader assumes 128 (llama.cpp reads it)", _head_dim(config))
    if config.model_type == "gemma2":
        for key, default in (("query_pre_attn_scalar", 256), ("attn_logit_softcapping", 50.0),
                             ("final_logit_softcapping", 30.0)):
            if getattr(config, key, default) != default:
                log.warning("gemma2 %s=%s: transformers' GGUF loader assumes %s", key, getattr(config, key), default)


def add_metadata(w, config, arch, name: str) -> None:
    """The architecture keys llama.cpp reads for `config`'s family."""
    import gguf

    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_head_count(int(config.num_attention_heads))
    w.add_head_count_kv(int(config.num_key_value_heads or config.num_attention_heads))
    w.add_key_length(_head_dim(config))
    w.add_value_length(_head_dim(config))
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(int(config.vocab_size))
    if arch == gguf.MODEL_ARCH.LLAMA:
        w.add_rope_dimension_count(_head_dim(config))
    if arch == gguf.MODEL_ARCH.GEMMA2:
        w.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
        w.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
        if getattr(config, "sliding_window", None):
            w.add_sliding_window(int(config.sliding_window))


def _interleave_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """(n_head * d, in) with each head's rows as [first half | second half] -> rows in pairs (h0, h1, h0', h1', ...):
    the layout llama.cpp's rope (neighbouring pairs) expects for HF's rotate-half weights."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model, fam: GGUFFamily):
    """(gguf name, fp32 numpy array) for each tensor of `model`'s state dict, in llama.cpp's layout."""
    import gguf

    cfg = model.config
    arch = getattr(gguf.MODEL_ARCH, fam.arch)
    name_map = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    allowed = set(gguf.MODEL_TENSORS[arch])
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for key, t in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        stem, _, suffix = key.rpartition(".")
        found = name_map.get_type_and_name(stem)
        if found is None or found[0] not in allowed:
            raise ValueError(f"{key}: no GGUF tensor name for it in llama.cpp's {fam.arch.lower()} architecture")
        t = t.detach().float().cpu()
        if fam.permute_qk and stem.endswith("q_proj"):
            t = _interleave_rotary(t, cfg.num_attention_heads)
        elif fam.permute_qk and stem.endswith("k_proj"):
            t = _interleave_rotary(t, cfg.num_key_value_heads or cfg.num_attention_heads)
        if fam.norm_plus_one and stem.endswith("norm"):
            t = t + 1.0
        yield f"{found[1]}.{suffix}", t.numpy()


def _encode(data: np.ndarray, kind: str):
    """(array, raw GGML type or None) of one tensor for the file type `kind`."""
    import gguf

    q = gguf.GGMLQuantizationType
    if data.ndim < 2:
        return data.astype(np.float32), None
    if kind == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0] == 0:
        return gguf.quants.quantize(data, q.Q8_0), q.Q8_0
    if kind == "bf16":
        return gguf.quants.quantize(data, q.BF16), q.BF16
    return data.astype(np.float16), None


_FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def write_gguf(model, vocab_fields: dict, out: str | Path, *, kind: str = "f16", name: str | None = None,
               overwrite: bool = False) -> Path:
    """Write `model` (an HF *ForCausalLM of a GGUF_FAMILIES family) and the tokenizer keys `vocab_fields`
    (`gguf_vocab`) to the GGUF file `out`, whole or not at all.

    Raises:
        ValueError: an unsupported family, rope scaling or `kind`.
        OutputError: `out` exists (and `overwrite` is false) or is a directory.
        DiskFullError: the disk filled up (the temporary file is removed, `out` is untouched).
    """
    import gguf

    from sftfuse.train.gguf_vocab import add_fields

    if kind not in TYPES:
        raise ValueError(f"kind={kind!r}: expected one of {TYPES}")
    out = Path(out)
    check_out(out, overwrite=overwrite)
    fam = _family(model.config)
    _warn_unreadable(model.config)
    arch = getattr(gguf.MODEL_ARCH, fam.arch)
    od.clean_stale(out.parent)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with od.disk_errors(out):
            w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
            add_metadata(w, model.config, arch, name or getattr(model.config, "name_or_path", "") or "model")
            w.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[kind]))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            add_fields(w, vocab_fields)
            for tname, data in gguf_tensors(model, fam):
                enc, raw = _encode(data, kind)
                w.add_tensor(tname, enc, raw_dtype=raw)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            od.fsync_path(tmp)
            check_out(out, overwrite=overwrite)  # still free: nothing appeared there meanwhile
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    od.fsync_path(out.parent)
    return out


def check_out(out: Path, *, overwrite: bool) -> None:
    if out.is_dir():
        raise od.OutputError(f"{out} is a directory; give a file name ending in .gguf")
    if out.exists() and not overwrite:
        raise od.OutputError(f"{out} exists; choose another file name, or pass --overwrite to replace it")
    if not out.name.endswith(".gguf"):
        raise ValueError(f"{out}: the output file name must end in .gguf")
    out.parent.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------------------------- the command
def vocab_fields_for(tok, model, base_source: str | None) -> dict:
    """Tokenizer keys: copied from the base GGUF when the base is one (the default model is), else built from
    `tok`."""
    from sftfuse.train import gguf_vocab
    from sftfuse.train.models import gguf_path

    if base_source is None:
        return gguf_vocab.from_gguf(gguf_path())
    if str(base_source).endswith(".gguf"):
        return gguf_vocab.from_gguf(base_source)
    return gguf_vocab.from_hf(tok, int(model.config.vocab_size))


CHECK_TEXTS = ("Hello world!", "  leading spaces, digits 12345 and 3.14", "naïve café — ünïcödé ✓", "a\n\nb\tc")


@torch.no_grad()
def check_roundtrip(path: str | Path, model, tok, examples: list[dict]) -> dict:
    """Load `path` back with transformers and compare with `model` (fp32) and `tok`: per-row cosine of the logits
    (the smallest), top-1 agreement, and whether both tokenizers give the same ids on the rows' texts, CHECK_TEXTS
    and a chat-template rendering."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok_back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    cos, agree, n = [], 0, 0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        a, b = model(input_ids=ids).logits[0].float(), back(input_ids=ids).logits[0].float()
        # in fp64: over a row of ~10^6 logits an fp32 cosine read 1.000096 for a faithful file
        cos.append(float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0)))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += ids.shape[1]
    texts = [*CHECK_TEXTS, *(tok.decode(ex["input_ids"]) for ex in examples)]
    if getattr(tok, "chat_template", None):
        texts.append(tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                             add_generation_prompt=True))
    same = [tok(t)["input_ids"] == tok_back(t)["input_ids"] for t in texts]
    return {"cosine_min": min(cos) if cos else None, "top1": agree / n if n else None, "rows": len(examples),
            "tokenization_same": all(same), "texts": len(texts), "texts_differing": same.count(False)}


def export(adapter_dir, out, *, kind: str = "f16", base_model: str | None = None, merge_into: str = "auto",
           overwrite: bool = False, fidelity_rows: int = 32, validation_file=None, check_rows: int = 8):
    """`sftfuse export-gguf`: merge the adapter (`merge.merge`), write `out`, and (check_rows > 0) load it back
    with transformers to compare. Returns (path, Merged, check dict or None)."""
    from sftfuse.train.merge import fidelity_examples, merge

    if kind not in TYPES:
        raise ValueError(f"--type {kind}: expected one of {', '.join(TYPES)}")
    check_out(Path(out), overwrite=overwrite)  # before anything loads
    merged = merge(adapter_dir, base_model=base_model, merge_into=merge_into, fidelity_rows=fidelity_rows,
                   validation_file=validation_file)
    fields = vocab_fields_for(merged.tok, merged.model, merged.base_source)
    from sftfuse.train.adapter import DEFAULT_MODEL_ID

    base = Path(str(merged.base_source or DEFAULT_MODEL_ID)).name.removesuffix(".gguf")  # no local path in the file
    name = f"{base} + {Path(adapter_dir).resolve().name} ({merged.mode} merge)"
    path = write_gguf(merged.model, fields, out, kind=kind, name=name, overwrite=overwrite)
    check = None
    if check_rows:
        check = check_roundtrip(path, merged.model, merged.tok,
                                fidelity_examples(merged.tok, validation_file, rows=check_rows))
    return path, merged, check
