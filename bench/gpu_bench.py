"""GPU benchmarks, run by bench/gpu.sh on a CUDA machine (never by tests or CI): `python bench/gpu_bench.py ops|step`.

ops: each op, forward + backward, against eager PyTorch, Liger (if `liger_kernel` imports) and bitsandbytes + PEFT
(if bitsandbytes runs on this GPU), on the same inputs in the same process: median of CUDA-event-timed repeats
after warm-up, peak memory beyond the inputs (`torch.cuda.max_memory_allocated`), and the cost model's predicted
H100 time beside it (`sftfuse.kernels.roofline`). FLOPs written beside each case.
step: one SFT step (AdamW over LoRA r=16 adapters on every linear, 8 x 1024 tokens, the first half of every row a
prompt) of a SmolLM2-135M-shaped and a ~1B Llama-shaped model built from their configs (random weights: speed and
memory do not depend on them): HF + PEFT, the same patched by sftfuse, HF + PEFT over bitsandbytes NF4, sftfuse QLoRA.
Each writes a Markdown table (bench/results/gpu_<what>.md) naming the GPU and library versions.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sftfuse.kernels import roofline  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16


def versions() -> str:
    out = [f"GPU: {torch.cuda.get_device_name()}", f"torch {torch.__version__}"]
    for name in ("triton", "transformers", "peft", "bitsandbytes", "liger_kernel"):
        try:
            mod = __import__(name)
            out.append(f"{name} {getattr(mod, '__version__', '?')}")
        except Exception:  # noqa: BLE001 - absent or broken: reported as such
            out.append(f"{name} absent")
    return ", ".join(out) + f"; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"


def measure(fn, reps: int = 5, warmup: int = 2) -> tuple[float, float]:
    """(median seconds, peak bytes beyond what was allocated before) of fn() on the GPU."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    gc.collect()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), torch.cuda.max_memory_allocated() - base


def grad_step(loss_fn, leaves, grad=None):
    """A function running loss_fn() and its gradient to `leaves` (with upstream `grad` when given)."""
    def step():
        torch.autograd.grad(loss_fn(), leaves, grad)
    return step


def _row(op, impl, fn, flops, predicted=None) -> dict:
    try:
        s, mem = measure(fn)
        return {"op": op, "impl": impl, "ms": s * 1e3, "TFLOP/s": flops / s / 1e12 if flops else None,
                "peak_MB": mem / 2**20, "predicted_ms": predicted}
    except Exception as e:  # noqa: BLE001 - one failing baseline must not stop the run
        return {"op": op, "impl": impl, "error": f"{type(e).__name__}: {str(e)[:120]}"}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# ops


def ce_cases(rows: list, n: int = 8192):
    from sftfuse.ops.cross_entropy import linear_cross_entropy

    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
    except Exception:  # noqa: BLE001
        liger = None
    for model in ("SmolLM2-135M", "Llama-3-8B"):
        H, V = roofline.MODELS[model]["H"], roofline.MODELS[model]["V"]
        for trained in (True, False):
            op = f"cross-entropy {model} n={n} {'trained' if trained else 'frozen'} head"
            h = torch.randn(n, H, device=DEV, dtype=BF16, requires_grad=True)
            w = (torch.randn(V, H, device=DEV) * H**-0.5).to(BF16).requires_grad_(trained)
            y = torch.randint(0, V, (n,), device=DEV)
            leaves = [h, w] if trained else [h]
            flops = (6 if trained else 4) * n * H * V
            pred = roofline.total(roofline.ce_ours(n, V, H, trained=trained))["time_s"] * 1e3
            rows.append(_row(op, "sftfuse", grad_step(lambda h=h, w=w, y=y: linear_cross_entropy(h, w, y), leaves),
                             flops, pred))
            rows.append(_row(op, "eager (fp32 logits)", grad_step(
                lambda h=h, w=w, y=y: F.cross_entropy(F.linear(h, w).float(), y), leaves), flops))
            if liger is not None:
                pred = roofline.total(roofline.ce_liger(n, V, H, trained=trained))["time_s"] * 1e3
                rows.append(_row(op, "Liger FLCE", grad_step(lambda h=h, w=w, y=y: liger(w, h, y), leaves), flops,
                                 pred))


def linear_cases(rows: list, n: int = 8192, r: int = 16):
    from sftfuse.kernels.nf4 import quantize_nf4
    from sftfuse.ops.lora import lora_linear

    H, I_ = roofline.MODELS["Llama-3-8B"]["H"], roofline.MODELS["Llama-3-8B"]["I"]
    for name, N, K in (("q_proj", H, H), ("down_proj", H, I_)):
        x = torch.randn(n, K, device=DEV, dtype=BF16, requires_grad=True)
        W = (torch.randn(N, K, device=DEV) * K**-0.5).to(BF16)
        A = (torch.randn(r, K, device=DEV) * K**-0.5).to(BF16).requires_grad_()
        B = (torch.randn(N, r, device=DEV) * 0.01).to(BF16).requires_grad_()
        dy = torch.randn(n, N, device=DEV, dtype=BF16)
        flops = 4 * n * N * K + 6 * n * r * (N + K)
        leaves = [x, A, B]
        op = f"LoRA {name} Llama-3-8B ({K}->{N}, r={r}, n={n})"
        pred = roofline.total(roofline.lora_ours(n, N, K, r)[0])["time_s"] * 1e3
        rows.append(_row(op, "sftfuse", grad_step(lambda x=x, W=W, A=A, B=B: lora_linear(x, W, A, B, 2.0), leaves,
                                                  dy), flops, pred))
        rows.append(_row(op, "eager (PEFT-style)", grad_step(
            lambda x=x, W=W, A=A, B=B: F.linear(x, W) + 2.0 * F.linear(F.linear(x, A), B), leaves, dy), flops))
        if name != "down_proj":
            continue
        q = quantize_nf4(W)
        op = f"QLoRA {name} Llama-3-8B (NF4 {K}->{N}, r={r}, n={n})"
        pred = roofline.total(roofline.lora_ours(n, N, K, r, nf4=True)[0])["time_s"] * 1e3
        rows.append(_row(op, "sftfuse", grad_step(lambda x=x, q=q, A=A, B=B: lora_linear(x, q, A, B, 2.0), leaves,
                                                  dy), flops, pred))
        try:
            import bitsandbytes as bnb
            w4, st = bnb.functional.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
            rows.append(_row(op, "bitsandbytes + PEFT-style", grad_step(
                lambda x=x, w4=w4, st=st, A=A, B=B: bnb.matmul_4bit(x, w4.t(), quant_state=st)
                + 2.0 * F.linear(F.linear(x, A), B), leaves, dy), flops))
        except Exception as e:  # noqa: BLE001
            rows.append({"op": op, "impl": "bitsandbytes + PEFT-style", "error": f"{type(e).__name__}: {e}"[:120]})


def norm_mlp_cases(rows: list, n: int = 8192):
    from sftfuse.ops.rms_norm import rms_norm

    H, I_ = roofline.MODELS["Llama-3-8B"]["H"], roofline.MODELS["Llama-3-8B"]["I"]
    x = torch.randn(n, H, device=DEV, dtype=BF16, requires_grad=True)
    w = torch.ones(H, device=DEV, dtype=BF16, requires_grad=True)
    dy = torch.randn_like(x)

    def eager_norm():
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(BF16)
    op = f"RMSNorm Llama-3-8B ({H}, n={n})"
    pred = roofline.total(roofline.rms_norm_ours(n, H)[0])["time_s"] * 1e3
    rows.append(_row(op, "sftfuse", lambda: torch.autograd.grad(rms_norm(x, w, 1e-6), [x, w], dy), 0, pred))
    rows.append(_row(op, "eager", lambda: torch.autograd.grad(eager_norm(), [x, w], dy), 0))
    try:
        from liger_kernel.transformers import LigerRMSNorm
        ln = LigerRMSNorm(H, eps=1e-6).to(DEV, BF16)
        rows.append(_row(op, "Liger", lambda: torch.autograd.grad(ln(x), [x], dy), 0))
    except Exception:  # noqa: BLE001
        pass
    g = torch.randn(n, I_, device=DEV, dtype=BF16, requires_grad=True)
    u = torch.randn(n, I_, device=DEV, dtype=BF16, requires_grad=True)
    dh = torch.randn_like(g)
    op = f"SwiGLU elementwise Llama-3-8B ({I_}, n={n})"
    rows.append(_row(op, "eager", lambda: torch.autograd.grad(F.silu(g) * u, [g, u], dh), 0))
    try:
        from sftfuse.kernels import gated_mlp
        fwd, bwd = gated_mlp.gated_fwd, gated_mlp.gated_bwd
        pred = roofline.total(roofline.gated_ours(n, I_)[0])["time_s"] * 1e3
        rows.append(_row(op, "sftfuse (kernels)", lambda: bwd(dh.clone(), g, u, "silu") and fwd(g, u, "silu"), 0,
                         pred))
    except Exception as e:  # noqa: BLE001 - the Triton gated kernels arrive with issue 14's other half
        rows.append({"op": op, "impl": "sftfuse (kernels)", "error": f"{type(e).__name__}: {e}"[:120]})
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        rows.append(_row(op, "Liger", lambda: torch.autograd.grad(LigerSiLUMulFunction.apply(g, u), [g, u], dh), 0))
    except Exception:  # noqa: BLE001
        pass


# ---------------------------------------------------------------------------------------------------------------
# step

STEP_MODELS = {  # built from config, random weights
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "Llama-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
BATCH, SEQ, RANK = 8, 1024, 16


def _bnb_quantize(model):
    """Every linear but the head as a bitsandbytes NF4 Linear4bit (double quant, bf16 compute), quantized on .to()."""
    import bitsandbytes as bnb

    for mname, lin in list(model.named_modules()):
        if isinstance(lin, torch.nn.Linear) and not mname.endswith("lm_head"):
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=BF16,
                                  quant_type="nf4", compress_statistics=True)
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
            parent, _, child = mname.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    return model.to(DEV)


def _model(name: str, config: str):
    import peft
    from transformers import AutoModelForCausalLM, LlamaConfig

    d = STEP_MODELS[name]
    cfg = LlamaConfig(**d, head_dim=d["hidden_size"] // d["num_attention_heads"], max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEV):  # initialized on the GPU: seconds, not the CPU's minute for ~1B parameters
        model = AutoModelForCausalLM.from_config(cfg, dtype=BF16)
    lcfg = peft.LoraConfig(r=RANK, lora_alpha=32, target_modules="all-linear")
    if config in ("hf+peft", "sftfuse"):
        model = peft.get_peft_model(model.to(DEV), lcfg)
        if config == "sftfuse":
            from sftfuse.patch.patcher import patch_model
            patch_model(model, strict=True)
    elif config == "bnb+peft":
        model = peft.get_peft_model(_bnb_quantize(model), lcfg)
    else:  # sftfuse QLoRA
        from sftfuse.modules.linear import LoRALinear, NF4Linear
        from sftfuse.modules.quantize import quantize_model
        from sftfuse.patch.patcher import patch_model
        model = model.to(DEV)
        quantize_model(model, compute_dtype=BF16)
        model.requires_grad_(False)
        for mname, module in list(model.named_modules()):
            if isinstance(module, NF4Linear):
                parent, _, child = mname.rpartition(".")
                setattr(model.get_submodule(parent), child, LoRALinear.from_linear(module, r=RANK, lora_alpha=32))
        patch_model(model, strict=True)
    return model.train()


def step_rows(rows: list, names, steps: int = 5):
    for name in names:
        V = STEP_MODELS[name]["vocab_size"]
        ids = torch.randint(0, V, (BATCH, SEQ), device=DEV)
        labels = ids.clone()
        labels[:, : SEQ // 2] = -100
        for config in ("hf+peft", "sftfuse", "bnb+peft", "sftfuse-qlora"):
            rows.append(_step_row(name, config, ids, labels, steps))
            gc.collect()
            torch.cuda.empty_cache()


def _step_row(name, config, ids, labels, steps) -> dict:
    op = f"SFT step {name} ({BATCH}x{SEQ} tokens, half prompt)"
    try:
        model = _model(name, config)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        s, _ = measure(step, reps=steps, warmup=2)
        return {"op": op, "impl": config, "ms": s * 1e3, "tokens/s": BATCH * SEQ / s,
                "peak_MB": torch.cuda.max_memory_allocated() / 2**20}
    except Exception as e:  # noqa: BLE001 - bitsandbytes may not run here; the others still do
        return {"op": op, "impl": config, "error": f"{type(e).__name__}: {e}"[:160]}


def write(rows: list, path: Path, title: str) -> None:
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = [f"# {title}", "", versions(), "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [(f"{r[c]:,.3f}" if isinstance(r.get(c), float) else str(r.get(c, ""))) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("ops", "step"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", nargs="*", default=list(STEP_MODELS))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device", file=sys.stderr)
        return 2
    rows: list = []
    if args.what == "ops":
        for cases in (ce_cases, linear_cases, norm_mlp_cases):
            try:
                cases(rows)
            except Exception as e:  # noqa: BLE001
                rows.append({"op": cases.__name__, "impl": "-", "error": f"{type(e).__name__}: {e}"[:160]})
        write(rows, args.out, "sftfuse ops on the GPU, forward + backward (bf16)")
    else:
        step_rows(rows, args.models)
        write(rows, args.out, "sftfuse SFT step on the GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
