"""Fixtures of the train tests: a tiny Llama with its tokenizer, and a small data set (helpers: common.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.train.common import CHATML, _rows


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Llama and a 600-token byte-level BPE with a ChatML template, saved like any HF model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sftfuse.train.models import tiny_model

    d = tmp_path_factory.mktemp("tiny")
    texts = [m["content"] for r in _rows("train", 400) for m in r["messages"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(texts + ["user assistant system\n"], trainers.BpeTrainer(
        vocab_size=600, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|im_start|>")
    tok.chat_template = CHATML
    tok.save_pretrained(d)
    model = tiny_model("llama", vocab_size=len(tok), seed=1)
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    fams = ("bracket_upper", "count_items")
    for split, n in (("train", 24), ("validation", 8), ("test", 6)):
        with open(d / f"{split}.jsonl", "w") as f:
            for r in _rows(split, n, fams):
                f.write(json.dumps(r) + "\n")
    (d / "probe.json").write_text(json.dumps(["What is the capital of France?", "Name a colour."]))
    return d
