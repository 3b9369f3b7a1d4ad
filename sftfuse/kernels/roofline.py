"""Cost model of every GPU op, beside the same model applied to its peers: `python -m sftfuse.kernels.roofline`.

For each op at SmolLM2-135M and Llama-3-8B shapes with 8192 tokens: FLOPs, HBM bytes, atomic (or lock-protected)
accumulation updates, launches and a predicted H100 time. Each launch costs
    max(FLOPs / PEAK, HBM bytes / HBM_BW, accumulation bytes / L2_BW) + LAUNCH_S
summed over launches: a roofline at the issue's figures (989 TFLOP/s dense bf16, 3.35 TB/s), the same for every
design, with no efficiency factor (a design that runs nearer its roofline is not credited). fp32 tensor work
(tf32x3: three TF32 products) counts 3 x at the TF32 rate (494.5 TFLOP/s).

The model reads the launch decisions from the kernels themselves, so it cannot drift from them:
- cross-entropy: `cross_entropy_triton.lce_plan` (chunk rows, vocabulary slices, each kernel's tiles and grid), the
  one function the launchers call (tests/kernels/test_roofline.py replays the launcher and compares grids).
- LoRA / NF4 / RMSNorm / gated MLP: the kernels module's `plan(...)` when it has one (the interface below); else
  the design of issue 14's Build section, marked "design" in the table.
Interface a kernels module offers (all keyword arguments optional beyond the shape):
    lora.plan(M, N, K, r, device_props, *, p, nf4, dtype, need_dx) -> {"launches": [launch, ...]}
    nf4.plan(M, N, K, device_props, *, dtype, transposed) -> {"path": name, name: {"launches": [...]}, ...}
    rms_norm.plan(M, H, *, dtype, need_dw) -> {"launches": [...]};  gated_mlp.plan(M, F, *, dtype) -> same
    launch = {"name", "flops", "bytes"[, "atomics", "alu_ops"]}: tensor FLOPs, HBM bytes, accumulation updates and
    non-tensor instructions (an in-loop decode, say). The time is this model's, from those numbers, so that every
    design in a row group is timed alike (a module's own "time_s" is not used).

Peers, each from its published design (read, not run):
- Liger FLCE: rows in chunks of next_pow2(n / ceil(V / H)); per chunk a cuBLAS logits GEMM (16-bit logits), its
  cross-entropy kernel (two reads, one in-place write of the chunk), dh = g W, and dW += g^T h accumulated in the
  weight's dtype (a 16-bit read-modify-write of V x H per chunk).
- CCE: forward over (256-row x 128-vocab) tiles, 8 row blocks per group; backward over 128 x 128 tiles recomputing
  the logits, then dh and dW accumulated into 16-bit buffers under locks (a load + store per element per tile,
  modelled as L2 traffic). Its gradient filtering skips tiles whose gradient is below bf16 resolution: data-dependent,
  shown separately with an assumed share skipped.
- dequantize + cuBLAS: one pass writes the 16-bit weight, then the library GEMM.
Not measured: no GPU ran any of this (README, GPU section).
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys

import torch

PEAK = 989e12  # H100 SXM dense bf16/fp16 tensor FLOP/s
PEAK_TF32 = 494.5e12
HBM_BW = 3.35e12  # bytes/s
SMS_H100 = 132
L2_BW = 5.5e12  # bytes/s: an H100's measured L2 bandwidth (Chips and Cheese, H100 PCIe); an assumption for SXM
ALU_RATE = SMS_H100 * 128 * 1.755e9  # non-tensor instructions/s: 132 SMs x 128 lanes x boost clock
LAUNCH_S = 4e-6
SMS = SMS_H100
CCE_FILTER_SKIP = 0.9  # assumed share of CCE's backward tiles its gradient filter skips (data-dependent)

MODELS = {  # hidden, intermediate, vocab
    "SmolLM2-135M": {"H": 576, "I": 1536, "V": 49152},
    "Llama-3-8B": {"H": 4096, "I": 14336, "V": 128256},
}
TOKENS = 8192
RANK = 16


def cdiv(a, b) -> int:
    return -(-a // b)


def launch(name, flops=0.0, hbm=0.0, atomics=0, atomic_bytes=0, *, alu_ops=0, fp32_dot=False, time_s=None,
           **extra) -> dict:
    """One launch's cost: the slowest of tensor work, HBM traffic and L2 accumulation traffic, plus its non-tensor
    instructions and a fixed cost (time_s: given outright, for a launch modelled as several steps)."""
    peak = PEAK_TF32 / 3 if fp32_dot else PEAK
    t = time_s if time_s is not None else (max(flops / peak, hbm / HBM_BW, atomic_bytes / L2_BW) + alu_ops / ALU_RATE
                                           + LAUNCH_S)
    return {"name": name, "flops": flops, "bytes": hbm, "atomics": atomics, "time_s": t, **extra}


def gemm(name, m, n, k, elem, *, accumulate_bytes=0, fp32_dot=False) -> dict:
    """A library (or owned-tile Triton) GEMM (m, k) @ (k, n): each operand read once, the output written once;
    accumulate_bytes: an output read back (beta = 1)."""
    return launch(name, 2.0 * m * n * k, (m * k + k * n + m * n) * elem + accumulate_bytes, fp32_dot=fp32_dot)


def total(launches: list[dict]) -> dict:
    return {k: sum(x[k] for x in launches) for k in ("flops", "bytes", "atomics", "time_s")} | {
        "launches": len(launches)}


# ---------------------------------------------------------------------------------------------------------------
# Cross-entropy: ours from lce_plan, Liger FLCE, CCE


def ce_ours(n, V, H, dtype=torch.bfloat16, *, trained: bool, sms: int = SMS, interpret: bool = False) -> list[dict]:
    """sftfuse's Triton linear + cross-entropy, forward + backward (gradients formed in the forward), launch by
    launch as `cross_entropy_launch.lce_grads_triton` issues them. Triton launches carry `kernel`, `grid`, `meta`."""
    from sftfuse.kernels.cross_entropy_triton import lce_plan

    pl = lce_plan(n, V, H, dtype, grads=True, need_dw=trained, sms=sms, interpret=interpret)
    e = torch.empty(0, dtype=dtype).element_size()
    ge = 4 if pl.stats["UPCAST"] else e  # the gradient's dtype
    fp32 = dtype == torch.float32
    out = []
    for i, s in enumerate(range(0, n, pl.rows)):
        c = min(pl.rows, n - s)
        num_m = -(-c // pl.stats["BLOCK_M"])
        w_sweeps = -(-num_m // sms)  # the row blocks of a slice run together (row blocks fastest): one W read each
        meta = {k: v for k, v in pl.stats.items()} | {"STORE_Z": True}
        out.append(launch("stats: logits tiles, online lse per vocabulary slice, fp32 logits kept",
                          2.0 * c * V * H, w_sweeps * V * H * e + c * H * e + 4.0 * c * V + 16.0 * pl.splits * c,
                          fp32_dot=fp32, kernel="_lce_stats_kernel", grid=(num_m * pl.splits,), meta=meta))
        out.append(launch("merge: log-sum-exp over slices (torch, ~8 ops)", 0, 16.0 * pl.splits * c + 40.0 * c,
                          time_s=8 * LAUNCH_S + (16.0 * pl.splits * c + 40.0 * c) / HBM_BW))
        out.append(launch("grad: logits -> dloss/dz in place", 0, c * V * (4.0 + ge), kernel="_lce_grad_kernel",
                          grid=(c,), meta=dict(pl.grad)))
        out.append(gemm("dh = g W (cuBLAS)", c, H, V, e))
        if trained:
            first = i == 0
            out.append(launch("dW [+]= g^T h (owned tiles)", 2.0 * c * V * H,
                              c * V * ge + c * H * e + V * H * 4.0 * (1 if first else 2), fp32_dot=fp32,
                              kernel="_lce_dw_kernel", grid=pl.dw_grid, meta=dict(pl.dw) | {"FIRST": first}))
    scale = n * H * e + (V * H * 4 if trained else 0)  # the backward scales the formed gradients by grad_output
    out.append(launch("backward: gradients x grad_output", 0, 2.0 * scale))
    return out


def ce_liger(n, V, H, dtype=torch.bfloat16, *, trained: bool) -> list[dict]:
    """Liger's fused linear cross-entropy as designed (chunk rule and passes from its source)."""
    e = torch.empty(0, dtype=dtype).element_size()
    inc = -(-V // H)
    chunk = 1 << max(0, math.ceil(math.log2(max(1, -(-n // inc)))))
    out = []
    for s in range(0, n, chunk):
        c = min(chunk, n - s)
        out.append(gemm("logits chunk (cuBLAS, 16-bit)", c, V, H, e))
        out.append(launch("CE kernel: two reads, gradient written in place", 0, 3.0 * c * V * e))
        out.append(gemm("dh = g W (cuBLAS)", c, H, V, e))
        if trained:
            out.append(gemm("dW += g^T h (cuBLAS addmm, weight dtype)", V, H, c, e, accumulate_bytes=V * H * e))
    return out


def ce_cce(n, V, H, dtype=torch.bfloat16, *, trained: bool, filter_skip: float = 0.0) -> list[dict]:
    """Cut Cross-Entropy as designed: forward lse kernel, backward recompute + lock-protected accumulation."""
    e = torch.empty(0, dtype=dtype).element_size()
    fb, fv, group = 256, 128, 8  # forward tiles and row-block group
    bb, bv = 128, 128  # backward tiles
    fwd_sweeps = cdiv(cdiv(n, fb), group)  # each group of row blocks sweeps the whole vocabulary
    out = [launch("CCE forward: logits tiles, lse merged under locks", 2.0 * n * V * H,
                  fwd_sweeps * V * H * e + n * H * e + 4.0 * n, atomics=n * cdiv(V, fv))]
    keep = 1.0 - filter_skip
    de_upd = keep * n * H * cdiv(V, bv)
    dc_upd = keep * V * H * cdiv(n, bb) if trained else 0
    sweeps = cdiv(cdiv(n, bb), group)
    hbm = sweeps * V * H * e + n * H * e + (sweeps * 2 * V * H * e if trained else 0)
    out.append(launch("CCE backward: recompute, dh/dW accumulated under locks", 2.0 * n * V * H * (1 + keep * (
        2 if trained else 1)), hbm, atomics=de_upd + dc_upd, atomic_bytes=2 * e * (de_upd + dc_upd)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# LoRA, NF4, RMSNorm, gated MLP: the kernels module's plan, or the Build-section design


def _module_plan(module: str, *args, **kwargs):
    """`sftfuse.kernels.<module>.plan(*args, **kwargs)`, or None when the module has no plan with that interface."""
    try:
        fn = getattr(importlib.import_module(f"sftfuse.kernels.{module}"), "plan", None)
        return fn(*args, **kwargs) if fn is not None else None
    except TypeError:  # a plan with another signature: not the interface above
        return None


def _as_launches(plan: dict) -> list[dict]:
    return [launch(x["name"], x.get("flops", 0), x.get("bytes", 0), x.get("atomics", 0), alu_ops=x.get("alu_ops", 0))
            for x in plan["launches"]]


def _nf4_bytes(N, K, blocksize=64):
    blocks = -(-N * K // blocksize)
    return (N * K + 1) // 2 + blocks + 4 * -(-blocks // 256)


def dequant_cublas(M, N, K, e=2, *, transposed=False) -> list[dict]:
    w4 = _nf4_bytes(N, K)
    out_n, red_k = (K, N) if transposed else (N, K)
    return [launch("dequantize NF4 -> 16-bit buffer", 0, w4 + N * K * e), gemm("cuBLAS GEMM", M, out_n, red_k, e)]


def lora_design(M, N, K, r, e=2, *, nf4=False) -> list[dict]:
    """Issue 14's LoRA design: rank-r projections once, base GEMM on cuBLAS (NF4: dequantize first), addmm updates."""
    def base(transposed):
        return dequant_cublas(M, N, K, e, transposed=transposed) if nf4 else [
            gemm("cuBLAS base GEMM", M, K if transposed else N, N if transposed else K, e)]
    return [gemm("t = x A^T", M, r, K, e), *base(False), gemm("y += s t B^T (addmm)", M, N, r, e,
                                                                 accumulate_bytes=M * N * e),
            gemm("u = dy B", M, r, N, e), *base(True), gemm("dx += s u A (addmm)", M, K, r, e,
                                                            accumulate_bytes=M * K * e),
            gemm("dA = u^T x", r, K, M, e), gemm("dB = dy^T t", N, r, M, e)]


def lora_ours(M, N, K, r, dtype=torch.bfloat16, *, nf4=False) -> tuple[list[dict], str]:
    pl = _module_plan("lora", M, N, K, r, None, p=0.0, nf4=nf4, dtype=dtype, need_dx=True)
    if pl is not None:
        return _as_launches(pl), "lora.plan"
    return lora_design(M, N, K, r, torch.empty(0, dtype=dtype).element_size(), nf4=nf4), "design"


def rms_norm_ours(M, H, dtype=torch.bfloat16) -> tuple[list[dict], str]:
    pl = _module_plan("rms_norm", M, H, dtype=dtype, need_dw=True)
    if pl is not None:
        return _as_launches(pl), "rms_norm.plan"
    e = torch.empty(0, dtype=dtype).element_size()
    parts = -(-M // 64)
    return [launch("fwd: x -> y, 1/rms", 0, 2.0 * M * H * e + 4 * M + H * e),
            launch("bwd: dy, x -> dx, dw partials", 0, 3.0 * M * H * e + 4 * M + parts * H * 4),
            launch("dw: partials summed", 0, parts * H * 4 + H * e)], "design"


def rms_norm_eager(M, H, dtype=torch.bfloat16) -> list[dict]:
    """Eager module: about 10 elementwise passes forward + backward (counted in issue 14), each an fp32 read + write."""
    return [launch(f"eager pass {i}", 0, 8.0 * M * H) for i in range(10)]


def gated_ours(M, F, dtype=torch.bfloat16) -> tuple[list[dict], str]:
    pl = _module_plan("gated_mlp", M, F, dtype=dtype)
    if pl is not None:
        return _as_launches(pl), "gated_mlp.plan"
    e = torch.empty(0, dtype=dtype).element_size()
    return [launch("fwd: h = act(g) u", 0, 3.0 * M * F * e),
            launch("bwd: dg, du from dh, g, u", 0, 5.0 * M * F * e)], "design"


def gated_eager(M, F, dtype=torch.bfloat16) -> list[dict]:
    """Eager SwiGLU: about 19 elementwise passes per MLP per step (issue 14), each a 16-bit read + write."""
    e = torch.empty(0, dtype=dtype).element_size()
    return [launch(f"eager pass {i}", 0, 2.0 * e * M * F) for i in range(19)]


def peft_eager(M, N, K, r, e=2, *, nf4=False) -> list[dict]:
    """PEFT's LoRA (bitsandbytes base when nf4): the same GEMMs, plus scale and add as separate passes over the
    (M, N) output forward and the (M, K) input gradient backward."""
    extra = [launch("scale + add (eager)", 0, 3.0 * M * N * e), launch("scale + add (eager)", 0, 3.0 * M * K * e)]
    return lora_design(M, N, K, r, e, nf4=nf4) + extra


# ---------------------------------------------------------------------------------------------------------------
# The table and the acceptance lines


def rows(model: str, n: int = TOKENS, dtype=torch.bfloat16) -> list[dict]:
    """Every op of `model` at n tokens: one row per implementation, ours first in each op."""
    d = MODELS[model]
    H, V, I_ = d["H"], d["V"], d["I"]
    e = torch.empty(0, dtype=dtype).element_size()
    out = []

    def add(op, impl, launches, source=""):
        out.append({"model": model, "op": op, "impl": impl, "source": source, **total(launches)})

    for trained in (True, False):
        op = f"cross-entropy, {'trained' if trained else 'frozen'} head (n={n}, V={V})"
        add(op, "sftfuse", ce_ours(n, V, H, dtype, trained=trained), "lce_plan")
        add(op, "Liger FLCE", ce_liger(n, V, H, dtype, trained=trained))
        add(op, "CCE", ce_cce(n, V, H, dtype, trained=trained))
        add(op, f"CCE, filter skips {CCE_FILTER_SKIP:.0%} (assumed)", ce_cce(n, V, H, dtype, trained=trained,
                                                                          filter_skip=CCE_FILTER_SKIP))
    for name, N, K in (("q_proj", H, H), ("down_proj", H, I_)):
        op = f"LoRA {name} ({K}->{N}, r={RANK}), fwd+bwd"
        launches, src = lora_ours(n, N, K, RANK, dtype)
        add(op, "sftfuse", launches, src)
        add(op, "base + adapter GEMMs", lora_design(n, N, K, RANK, e))
        add(op, "PEFT (eager)", peft_eager(n, N, K, RANK, e))
    op = f"QLoRA down_proj (NF4 {I_}->{H}, r={RANK}), fwd+bwd"
    launches, src = lora_ours(n, H, I_, RANK, dtype, nf4=True)
    add(op, "sftfuse", launches, src)
    add(op, "dequantize + cuBLAS + adapters", lora_design(n, H, I_, RANK, e, nf4=True))
    add(op, "bitsandbytes + PEFT", peft_eager(n, H, I_, RANK, e, nf4=True))
    op = f"RMSNorm ({H}), fwd+bwd"
    launches, src = rms_norm_ours(n, H, dtype)
    add(op, "sftfuse", launches, src)
    add(op, "eager", rms_norm_eager(n, H, dtype))
    op = f"SwiGLU elementwise ({I_}), fwd+bwd"
    launches, src = gated_ours(n, I_, dtype)
    add(op, "sftfuse", launches, src)
    add(op, "eager", gated_eager(n, I_, dtype))
    return out


def acceptance(table: list[dict]) -> list[tuple[str, float, float, bool]]:
    """Issue 14's cost-model claims at Llama-3-8B: (claim, ours, bound, holds)."""
    by = {(r["model"], r["op"], r["impl"]): r for r in table}
    checks = []
    for r in table:
        if r["model"] != "Llama-3-8B" or r["impl"] != "sftfuse":
            continue
        op = r["op"]
        if op.startswith("cross-entropy"):
            liger, cce = by[(r["model"], op, "Liger FLCE")], by[(r["model"], op, "CCE")]
            checks.append((f"{op}: time <= Liger FLCE", r["time_s"], liger["time_s"], r["time_s"] <= liger["time_s"]))
            checks.append((f"{op}: time <= 1.2 x CCE", r["time_s"], 1.2 * cce["time_s"],
                           r["time_s"] <= 1.2 * cce["time_s"]))
        elif op.startswith("LoRA"):
            floor = by[(r["model"], op, "base + adapter GEMMs")]["flops"]
            checks.append((f"{op}: FLOPs <= 1.05 x base + adapter GEMMs", r["flops"], 1.05 * floor,
                           r["flops"] <= 1.05 * floor))
        elif op.startswith("QLoRA"):
            ref = by[(r["model"], op, "dequantize + cuBLAS + adapters")]
            checks.append((f"{op}: bytes <= dequantize + cuBLAS", r["bytes"], ref["bytes"], r["bytes"] <= ref["bytes"]))
            checks.append((f"{op}: time <= dequantize + cuBLAS", r["time_s"], ref["time_s"],
                           r["time_s"] <= ref["time_s"]))
    return checks


def format_table(table: list[dict]) -> str:
    """A Markdown table: one line per (op, implementation), with time relative to ours."""
    head = "| model | op | implementation | GFLOP | HBM GB | atomics M | launches | predicted ms | vs sftfuse |"
    lines = [head, "|" + "---|" * 9]
    ours = {}
    for r in table:
        if r["impl"] == "sftfuse":
            ours[(r["model"], r["op"])] = r["time_s"]
        base = ours.get((r["model"], r["op"]))
        ratio = f"{r['time_s'] / base:.2f}x" if base else ""
        impl = r["impl"] + (f" ({r['source']})" if r["source"] else "")
        lines.append(f"| {r['model']} | {r['op']} | {impl} | {r['flops'] / 1e9:,.0f} | {r['bytes'] / 1e9:.2f} | "
                     f"{r['atomics'] / 1e6:,.0f} | {r['launches']} | {r['time_s'] * 1e3:.2f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=TOKENS)
    args = ap.parse_args(argv)
    table = [r for m in MODELS for r in rows(m, args.tokens)]
    print(f"Predicted on an H100 SXM ({PEAK / 1e12:.0f} TFLOP/s bf16, {HBM_BW / 1e12:.2f} TB/s HBM, L2 "
          f"{L2_BW / 1e12:.1f} TB/s for accumulations, {LAUNCH_S * 1e6:.0f} us per launch), bf16, "
          f"{args.tokens} tokens. A model, not a measurement.\n")
    print(format_table(table))
    checks = acceptance(table)
    print("\nIssue 14's claims at Llama-3-8B:")
    for claim, ours, bound, ok in checks:
        unit, scale = ("ms", 1e3) if "time" in claim else (("GB", 1e-9) if "bytes" in claim else ("GFLOP", 1e-9))
        print(f"  {'holds' if ok else 'FAILS'}: {claim} ({ours * scale:,.2f} vs {bound * scale:,.2f} {unit})")
    return 0 if all(c[3] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
