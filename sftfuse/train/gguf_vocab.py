"""A tokenizer as GGUF metadata (`tokenizer.ggml.*` and `tokenizer.chat_template`), for `sftfuse export-gguf`.

GGUF carries no tokenizer.json: llama.cpp (and transformers' GGUF loader) rebuild the tokenizer from a token list,
per-token types, BPE merges (and scores for a SentencePiece vocabulary), the special token ids, the add-BOS/EOS
flags and a pre-tokenizer name. Two sources:

- `from_gguf`: the base model is itself a GGUF file (the default model is): its tokenizer keys are copied as they
  are, so the exported file tokenizes exactly as the base did, pre-tokenizer name (e.g. "smollm") included;
- `from_hf`: an HF fast tokenizer with a BPE model. Byte-level BPE (GPT-2, Llama-3, Qwen) is written as "gpt2";
  BPE with byte fallback and a Metaspace ("▁") pre-tokenizer (Llama-2, Mistral, Gemma) as "llama", with the
  scores llama.cpp's SentencePiece tokenizer merges by (minus the merge rank that makes each token) and the merges
  too (transformers reads those). A token list shorter than the model's vocabulary is padded with `[PADn]`
  (type UNUSED), as llama.cpp's converter pads it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
# The pre-tokenizer split regexes transformers' GGUF loader knows, by llama.cpp name (a ByteLevel pre-tokenizer
# with its own regex is "gpt-2").
_KNOWN_SPLITS = ("llama-bpe", "qwen2")


def from_gguf(path: str | Path) -> dict:
    """The `tokenizer.*` keys of the GGUF file `path`: {key: (value, GGUFValueType, sub_type)}."""
    reader = gguf.GGUFReader(path)
    out = {}
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        out[key] = (f.contents(), vtype, sub)
    if "tokenizer.ggml.model" not in out:
        raise ValueError(f"{path}: this GGUF file carries no tokenizer (no tokenizer.ggml.model)")
    return out


def add_fields(writer: gguf.GGUFWriter, fields: dict) -> None:
    for key, (value, vtype, sub) in fields.items():
        writer.add_key_value(key, value, vtype, sub_type=sub)


def _bpe_json(tok) -> dict:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tok).__name__}: export-gguf needs a fast (tokenizers) tokenizer")
    js = json.loads(backend.to_str())
    if js["model"]["type"] != "BPE":
        raise ValueError(f"tokenizer model {js['model']['type']}: export-gguf writes BPE vocabularies only "
                         "(byte-level like GPT-2/Llama-3/Qwen, or SentencePiece-style like Llama-2/Gemma)")
    return js


def _parts(node: dict | None, kind: str) -> list[dict]:
    """The `kind` components of a (maybe Sequence) pre-tokenizer / decoder / normalizer node."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        key = "pretokenizers" if "pretokenizers" in node else "decoders" if "decoders" in node else "normalizers"
        return [p for n in node.get(key, []) for p in _parts(n, kind)]
    return [node] if node.get("type") == kind else []


def tokenizer_kind(js: dict) -> str:
    """"gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE with byte fallback)."""
    if _parts(js.get("pre_tokenizer"), "ByteLevel") or _parts(js.get("decoder"), "ByteLevel"):
        return "gpt2"
    if js["model"].get("byte_fallback") or _parts(js.get("pre_tokenizer"), "Metaspace") \
            or _parts(js.get("normalizer"), "Prepend"):
        return "llama"
    raise ValueError("tokenizer: neither byte-level BPE nor SentencePiece-style BPE; export-gguf cannot describe it")


def pre_name(js: dict) -> str:
    """llama.cpp's name of a byte-level tokenizer's pre-tokenizer (how text is split before BPE)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = js.get("pre_tokenizer") or {}
    splits = [p["pattern"].get("Regex") for p in _parts(pre, "Split") if isinstance(p.get("pattern"), dict)]
    for name in _KNOWN_SPLITS:
        if GGUF_PRE_TOKENIZER_SPLITS[name] in splits:
            return name
    if any(p.get("individual_digits") for p in _parts(pre, "Digits")):
        return "smollm"  # digits one by one, then GPT-2's byte-level split (SmolLM's own tokenizer)
    if any(p.get("use_regex", True) for p in _parts(pre, "ByteLevel")) and not splits:
        return "gpt-2"
    return "default"


def _merges(js: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in js["model"].get("merges", [])]


def _first_ids(tok) -> list[int]:
    return tok("a b")["input_ids"]


def from_hf(tok, n_vocab: int) -> dict:
    """The tokenizer keys for the HF fast tokenizer `tok`, padded to the model's vocabulary of `n_vocab` rows."""
    js = _bpe_json(tok)
    kind = tokenizer_kind(js)
    vocab = tok.get_vocab()
    if len(vocab) > n_vocab or max(vocab.values()) >= n_vocab:
        raise ValueError(f"tokenizer: {len(vocab)} tokens but the model's vocabulary has {n_vocab} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = {i: a for i, a in tok.added_tokens_decoder.items()}
    merges = _merges(js)
    rank = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), r)
    tokens, types, scores = [], [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif kind == "llama" and _BYTE_TOKEN.match(t):
            tokens.append(t)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.UNKNOWN if t == tok.unk_token else gguf.TokenType.NORMAL)
        scores.append(-float(rank[t]) - 1.0 if t in rank else 0.0)
    a = gguf.GGUFValueType
    fields = {"tokenizer.ggml.model": (kind, a.STRING, None),
              "tokenizer.ggml.pre": (pre_name(js) if kind == "gpt2" else "default", a.STRING, None),
              "tokenizer.ggml.tokens": (tokens, a.ARRAY, a.STRING),
              "tokenizer.ggml.token_type": ([int(x) for x in types], a.ARRAY, a.INT32)}
    if kind == "llama":
        fields["tokenizer.ggml.scores"] = (scores, a.ARRAY, a.FLOAT32)
        prefix = [p.get("prepend_scheme", "always") for p in _parts(js.get("pre_tokenizer"), "Metaspace")]
        fields["tokenizer.ggml.add_space_prefix"] = (bool(prefix and prefix[0] != "never"
                                                          or _parts(js.get("normalizer"), "Prepend")), a.BOOL, None)
    if merges:
        fields["tokenizer.ggml.merges"] = (merges, a.ARRAY, a.STRING)
    for name in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{name}_token_id", None)
        if tid is not None:
            key = "unknown" if name == "unk" else "padding" if name == "pad" else name
            fields[f"tokenizer.ggml.{key}_token_id"] = (int(tid), a.UINT32, None)
    ids = _first_ids(tok)
    fields["tokenizer.ggml.add_bos_token"] = (bool(tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id]),
                                              a.BOOL, None)
    fields["tokenizer.ggml.add_eos_token"] = (bool(tok.eos_token_id is not None and ids[-1:] == [tok.eos_token_id]),
                                              a.BOOL, None)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and template:
        fields["tokenizer.chat_template"] = (template, a.STRING, None)
    return fields
