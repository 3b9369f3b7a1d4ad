"""The PEFT QLoRA flow on the default model (SmolLM2-135M-Instruct), and a bitsandbytes 4-bit checkpoint of it
opened without bitsandbytes; prints the figures the README quotes and writes them to a JSON file.

    python scripts/peft_qlora_default.py [--steps 10] [--out bench/results/peft_qlora_default.json]

1. bf16 model -> `sftfuse.quantize_model` (NF4, bf16 compute) -> `peft.get_peft_model` with a plain LoraConfig
   (r=16, alpha=32, dropout 0.05, all seven projections) -> `sftfuse.patch_model` -> AdamW steps on the bundled
   training rows (4 rows a step, prompt tokens masked). The first batch's loss is also computed unpatched.
2. `save_pretrained`, then `PeftModel.from_pretrained` on a fresh bf16 model: the adapter's tensors must equal the
   trained ones; mean NLL of the answers of 16 validation rows for the base, the trained QLoRA model and the
   bf16 model with the adapter.
3. (if bitsandbytes is installed) transformers + bitsandbytes quantize the model to NF4 and save it; the
   directory is opened with `sftfuse.load_4bit_checkpoint` and both models' logits are compared.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rows(split: str, n: int) -> list[list[dict]]:
    lines = (ROOT / "sftfuse" / "data" / f"{split}.jsonl").read_text().splitlines()
    return [json.loads(x)["messages"] for x in lines[:n]]


def batch(tok, convs: list[list[dict]]) -> dict:
    """Right-padded ids with labels -100 on the prompt (everything before the last assistant turn) and padding."""
    seqs = []
    for msgs in convs:
        prompt = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(msgs, tokenize=False)
        p, f = tok(prompt, add_special_tokens=False)["input_ids"], tok(full, add_special_tokens=False)["input_ids"]
        seqs.append((f, len(p)))
    t = max(len(f) for f, _ in seqs)
    ids = torch.full((len(seqs), t), tok.pad_token_id)
    labels, mask = torch.full_like(ids, -100), torch.zeros_like(ids)
    for i, (f, p) in enumerate(seqs):
        ids[i, : len(f)], mask[i, : len(f)] = torch.tensor(f), 1
        labels[i, p: len(f)] = ids[i, p: len(f)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_nll(model, tok, convs) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for msgs in convs:
            b = batch(tok, [msgs])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            lab = b["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), lab, ignore_index=-100,
                                                    reduction="sum")
            total, n = total + nll.item(), n + int((lab != -100).sum())
    return total / n


def peft_flow(steps: int, out: Path) -> dict:
    import peft

    import sftfuse

    model, tok = sftfuse.load_default_model(dtype=torch.bfloat16)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    val = rows("validation", 16)
    base_nll = answer_nll(model, tok, val)
    sftfuse.quantize_model(model, compute_dtype=torch.bfloat16)
    model.train()
    cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, bias="none",
                          task_type="CAUSAL_LM")
    pm = peft.get_peft_model(model, cfg)
    train_rows = rows("train", 4 * steps)
    first = batch(tok, train_rows[:4])
    torch.manual_seed(0)
    unpatched_loss = pm(**first).loss.item()
    report = sftfuse.patch_model(pm)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    losses, times = [], []
    for s in range(steps):
        b = batch(tok, train_rows[4 * s: 4 * s + 4])
        t0 = time.perf_counter()
        loss = pm(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        print(f"step {s + 1}: loss {losses[-1]:.4f}  {times[-1]:.2f} s", flush=True)
    pm.eval()
    qlora_nll = answer_nll(pm, tok, val)
    pm.save_pretrained(out)
    trained = {n: p.detach() for n, p in pm.named_parameters() if ".lora_" in n}
    del pm, model, opt
    plain, _ = sftfuse.load_default_model(dtype=torch.bfloat16)
    loaded = peft.PeftModel.from_pretrained(plain, out).eval()
    got = {n: p.detach() for n, p in loaded.named_parameters() if ".lora_" in n}
    same = got.keys() == trained.keys() and all(torch.equal(got[k], trained[k].to(got[k].dtype)) for k in got)
    return {"steps": steps, "losses": losses, "unpatched_first_loss": unpatched_loss,
            "patched_first_loss": losses[0], "s_per_step": times,
            "swapped": sorted({e.op for e in report.swapped}), "adapter_tensors": len(got),
            "adapter_equal_after_load": same, "adapter_dtype": str(next(iter(got.values())).dtype),
            "val_answer_nll": {"bf16_base": base_nll, "nf4_qlora_trained": qlora_nll,
                               "bf16_with_adapter": answer_nll(loaded, tok, val)}}


def bnb_checkpoint(tmp: Path) -> dict:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return {"skipped": "bitsandbytes not installed"}
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import sftfuse
    from sftfuse.train.models import cache_dir

    src = cache_dir() / "SmolLM2-135M-Instruct"
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(src, quantization_config=qcfg, device_map="cpu", dtype=torch.bfloat16)
    ref.save_pretrained(tmp / "bnb")
    size = sum(f.stat().st_size for f in (tmp / "bnb").glob("*.safetensors"))
    ours = sftfuse.load_4bit_checkpoint(tmp / "bnb")
    _, tok = sftfuse.load_default_model(dtype=torch.bfloat16)
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = ref.train()(ids).logits.float(), ours(ids).logits.float()  # bnb's eval CPU path repacks weights
    return {"safetensors_mb": size / 1e6, "max_abs_logit_diff": (a - b).abs().max().item(),
            "max_abs_logit": a.abs().max().item(),
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(), "tokens": ids.shape[1]}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "peft_qlora_default.json"))
    args = ap.parse_args()
    import peft
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        res = {"peft_qlora": peft_flow(args.steps, Path(tmp) / "adapter"), "bnb_4bit_dir": bnb_checkpoint(Path(tmp)),
               "machine": cpu_name(), "threads": torch.get_num_threads(),
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": peft.__version__}}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
