"""The forgetting figures of the NF4 rounding alone: the default base model quantized to NF4 (no training), scored
by the same probe, KL and answer agreement a run reports, against that run's base-model answers.

    python scripts/nf4_probe.py RUN_DIR      # RUN_DIR: a finished `sftfuse train` output (its base_eval.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(run_dir: str) -> int:
    from sftfuse.modules.quantize import quantize_model
    from sftfuse.train import adapter as ad
    from sftfuse.train import forgetting as fg
    from sftfuse.train.base_eval import general_qa
    from sftfuse.train.models import load_model_and_tokenizer

    base = json.loads((Path(run_dir) / "base_eval.json").read_text())
    model, tok = load_model_and_tokenizer(None, dtype=torch.float32)
    model.to(torch.bfloat16)
    quantize_model(model, compute_dtype=torch.bfloat16)
    ad.merge_lora_(model, dtype=torch.bfloat16)  # no adapter: every NF4 layer back to a dense dequant(NF4(W))
    model.eval()
    tuned = fg.tuned_stats(model, tok, base["probe_prompts"], base["probe_answers"], base["probe_topk"])
    qa = fg.answer_probe(model, tok, general_qa(), batch_size=32)
    s = fg.summary(base["probe_base_nll"], tuned, fg.agreement(base["qa_base_correct"], qa))
    print(f"NF4 base, untrained: probe NLL {100 * s['relative_change']:+.1f}%, KL {s['kl']:.3f} per token, "
          f"agreement {s['answers']['still_correct']}/{s['answers']['base_correct']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
