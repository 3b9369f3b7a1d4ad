"""The forgetting figures (probe NLL, KL, answer agreement), the replay rows, and the bundled sets they use."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sftfuse.train import forgetting as fg
from sftfuse.train.data import bundled_path
from sftfuse.train.data_io import DataError


def _tiny(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)


@pytest.mark.parametrize(("text", "accepted", "ok"), [
    ("The capital of Italy is Rome.", ["rome"], True),
    ("ROME", ["rome"], True),
    ("Romeo and Juliet", ["rome"], False),  # a word inside a word is not the answer
    ("The freezing point is -18.0000001 Celsius.", ["0", "zero"], False),  # a digit inside a number is not "0"
    ("It is 0 degrees.", ["0"], True),
    ("The capital of India is New Delhi.", ["new delhi", "delhi"], True),
    ("", ["paris"], False),
])
def test_answer_is_correct_matches_whole_words(text, accepted, ok):
    assert fg.answer_is_correct(text, accepted) is ok


def test_bundled_sets_are_disjoint_and_large_enough():
    """The probes never train: no replay prompt is a probe prompt or a general question, and there are at least
    50 general questions (all answered correctly by the default base model when they were chosen)."""
    probe = set(json.loads(bundled_path("probe_prompts").read_text()))
    replay = json.loads(bundled_path("replay_prompts").read_text())
    qa = fg.load_general_qa(bundled_path("general_qa"))
    questions = {q["question"] for q in qa}
    assert len(qa) >= 50 and len(replay) >= 100 and len(set(replay)) == len(replay)
    assert not (set(replay) & probe) and not (set(replay) & questions) and not (questions & probe)


@pytest.mark.parametrize("content", ['{"question": "x"}', "[]", '[{"question": "q", "answers": []}]', "not json"])
def test_bad_general_qa_file_names_the_file(tmp_path, content):
    f = tmp_path / "qa.json"
    f.write_text(content)
    with pytest.raises(DataError, match="qa.json"):
        fg.load_general_qa(f)


def test_agreement_counts_only_what_the_base_got_right():
    a = fg.agreement([True, True, False, True], [True, False, True, True])
    assert (a["base_correct"], a["still_correct"]) == (3, 2) and a["agreement"] == pytest.approx(2 / 3)
    assert math.isnan(fg.agreement([False], [True])["agreement"])


def _exact_kl(base, tuned, tok, prompts, answers) -> float:
    """Full-vocabulary mean per-token KL(base || tuned) in fp64: the oracle."""
    kls = []
    for (lp, _), (lq, _) in zip(fg.answer_logprobs(base, tok, prompts, answers),
                                fg.answer_logprobs(tuned, tok, prompts, answers), strict=True):
        lp, lq = lp.double(), lq.double()
        kls.append((lp.exp() * (lp - lq)).sum(-1))
    return float(torch.cat(kls).mean())


def test_kl_is_zero_for_the_base_a_lower_bound_and_exact_with_the_whole_vocabulary(tiny_dir, monkeypatch):
    base, tok = _tiny(tiny_dir)
    prompts = ["<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nHi<|im_end|>\n"]
    answers = ["blue and green", "hello there, friend"]
    stats = fg.base_stats(base, tok, prompts, answers)
    same = fg.tuned_stats(base, tok, prompts, answers, stats["topk"])
    assert same["kl"] == pytest.approx(0, abs=1e-4) and same["nll"] == pytest.approx(stats["nll"], rel=1e-5)

    tuned, _ = _tiny(tiny_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    exact = _exact_kl(base, tuned, tok, prompts, answers)
    bound = fg.tuned_stats(tuned, tok, prompts, answers, stats["topk"])["kl"]
    assert 0 < bound <= exact * (1 + 1e-3)
    monkeypatch.setattr(fg, "TOPK", len(tok))  # every token kept: the figure is the exact KL
    full = fg.tuned_stats(tuned, tok, prompts, answers, fg.base_stats(base, tok, prompts, answers)["topk"])["kl"]
    assert full == pytest.approx(exact, rel=1e-3)


def test_answer_examples_mask_the_prompt_and_end_only_finished_answers(tiny_dir):
    _, tok = _tiny(tiny_dir)
    rows = fg.answer_examples(tok, ["user: hi\n", "user: yo\n", "user: x\n"], ["hello", "a cut answ", ""],
                              finished=[True, False, True], max_length=64)
    assert len(rows) == 2  # an empty answer is no example
    for row, end in zip(rows, (True, False), strict=True):
        p_len = len(tok("user: hi\n" if end else "user: yo\n", add_special_tokens=False)["input_ids"])
        assert row["labels"][:p_len] == [-100] * p_len and -100 not in row["labels"][p_len:]
        assert (row["labels"][-1] == tok.eos_token_id) is end


def test_mean_loss_is_the_token_weighted_mean_and_nan_without_labels(tiny_dir):
    from sftfuse.train import data

    model, tok = _tiny(tiny_dir)
    rows = fg.answer_examples(tok, ["user: hi\n", "user: what now\n"], ["hello", "nothing at all"], max_length=64)
    got = fg.mean_loss(model, rows, batch_size=1, pad_id=tok.pad_token_id, packed=False, mask_dtype=torch.float32,
                       device=torch.device("cpu"))
    with torch.no_grad():
        b = data.collate(rows, pad_id=tok.pad_token_id, packed=False)
        want = model(**b).loss  # one batch: HF's mean over every labelled token
    assert got == pytest.approx(float(want), rel=1e-5)
    empty = [{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}]
    assert math.isnan(fg.mean_loss(model, empty, batch_size=1, pad_id=0, packed=False, mask_dtype=torch.float32,
                                   device=torch.device("cpu")))


def test_mean_loss_patched_and_packed_equals_plain(tiny_dir, monkeypatch):
    """The trainer's validation and probe: a patched model scores through the fused loss (`loss_only`, no logits)
    and packed rows (per-document attention) score the same tokens, so the value is the plain, unpacked one."""
    from sftfuse.ops import cross_entropy as ce_op
    from sftfuse.patch.patcher import patch_model, unpatch_model
    from sftfuse.train import data

    model, tok = _tiny(tiny_dir)
    prompts = ["user: hi\n", "user: what now\n", "user: count to five\n"]
    rows = fg.answer_examples(tok, prompts, ["hello", "nothing at all", "one two three four five"], max_length=64)
    kw = {"pad_id": tok.pad_token_id, "mask_dtype": torch.float32, "device": torch.device("cpu")}
    plain = fg.mean_loss(model, rows, batch_size=2, packed=False, **kw)
    calls = []
    real = ce_op.linear_cross_entropy
    monkeypatch.setattr(ce_op, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    patch_model(model.train())
    packed = data.pack(rows, max_length=64)
    assert len(packed) == 1  # the three documents share one row
    got = fg.mean_loss(model, packed, batch_size=2, packed=True, **kw)
    assert calls and got == pytest.approx(plain, rel=1e-4)
    assert model.training  # mean_loss leaves the mode as it found it
    unpatch_model(model)


def test_warnings_name_the_levers():
    cfg = {"replay_ratio": 0.0, "lr": 1e-3, "max_steps": 60}
    calm = {"relative_change": 0.03, "answers": {"agreement": 0.95}}
    assert fg.warnings(calm, cfg) == [] and fg.warnings(None, cfg) == []
    bad = fg.warnings({"relative_change": 0.3, "answers": {"agreement": 0.5}}, cfg)
    assert len(bad) == 2 and all("replay_ratio" in w and "lr" in w for w in bad) and "+30.0%" in bad[0]


def test_generate_says_which_answers_were_cut(tiny_dir):
    from sftfuse.train.evaluation import generate

    model, tok = _tiny(tiny_dir)
    prompts, gen = ["a b c", "d e"], dict(max_new_tokens=3, batch_size=2, return_finished=True)
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tok)))
        model.lm_head.bias[tok.eos_token_id] = 100.0  # the end token first: every answer is finished
    assert generate(model, tok, prompts, **gen)[1] == [True, True]
    with torch.no_grad():
        model.lm_head.bias[tok.eos_token_id] = -100.0  # never: every answer is cut
    texts, done = generate(model, tok, prompts, **gen)
    assert done == [False, False] and all(texts)


def test_loss_curve_draws_the_probe_rise(tmp_path):
    from sftfuse.train.report import plot_losses

    metrics = [{"step": s, "loss": 2.0 / s} for s in range(1, 7)]
    plain = plot_losses(metrics, tmp_path / "plain.png").read_bytes()
    for s, rise in ((2, 0.01), (4, None), (6, 0.08)):  # a null figure (a NaN in metrics.jsonl) is a gap
        metrics[s - 1].update(val_loss=1.0 / s, probe_rise=rise)
    with_probe = plot_losses(metrics, tmp_path / "probe.png").read_bytes()
    assert with_probe != plain and len(with_probe) > 1000


def test_report_and_console_say_plainly_when_a_run_forgot():
    from sftfuse.train.report import forgetting_lines, summary_text

    cfg = {"replay_ratio": 0.0, "lr": 1e-3, "max_steps": 60}
    probe = {"n_prompts": 22, "base_nll": 1.0, "tuned_nll": 1.3, "relative_change": 0.3, "base_ppl": 2.7,
             "tuned_ppl": 3.7, "kl": 0.21,
             "answers": {"n_questions": 72, "base_correct": 72, "still_correct": 50, "agreement": 50 / 72}}
    run = {"steps": 60, "train_seconds": 100.0, "tokens_per_s": 400.0, "wall_seconds": 160.0, "peak_memory": "1 GiB"}
    report = "\n".join(forgetting_lines(probe, cfg))
    console = summary_text(run, None, None, probe, "adapter", "report.md", cfg)
    for text in (report, console):
        assert "FORGETTING" in text and "+30.0%" in text and "replay_ratio" in text and "69%" in text
    calm = {**probe, "tuned_nll": 1.02, "relative_change": 0.02, "answers": {**probe["answers"], "still_correct": 70,
                                                                            "agreement": 70 / 72}}
    assert "FORGETTING" not in summary_text(run, None, None, calm, "a", "r", cfg)
    assert "Within the limits" in "\n".join(forgetting_lines(calm, cfg))
