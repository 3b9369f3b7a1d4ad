"""LoRA linear forward + backward over SmolLM2-135M's seven linear shapes: sftfuse vs PEFT, 16-bit and NF4 bases.

One transformer block's linears, 1024 tokens, r=16, alpha=32, dropout 0.05, bf16 base. Inputs are shared as in
the model (q, k and v read one x; gate and up another), each requiring grad; backward takes a random dy per
output. PEFT runs with its default fp32 adapters (what get_peft_model gives on a bf16 base), ours with bf16
adapters (the base's compute dtype). "saved MB" sums the unique storages that autograd saves in the forward
(torch.autograd.graph.saved_tensors_hooks), parameters and frozen weights excluded: the activation memory.
FLOPs per linear (M tokens, K in, N out): base 2MKN forward + 2MKN for dx; adapters 2Mr(K+N) forward and
4Mr(K+N) backward (u, the dx term, dA, dB).
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import peak_memory, x_floor
from torch import nn

from sftfuse.modules.linear import LoRALinear

TOKENS, R, ALPHA, P = 1024, 16, 32, 0.05
H, FF = 576, 1536
# name: (in, out, input group): q, k, v share the attention input; gate and up share the MLP input.
LINEARS = {"q": (H, H, "attn"), "k": (H, 192, "attn"), "v": (H, 192, "attn"), "o": (H, H, "o"),
           "gate": (H, FF, "mlp"), "up": (H, FF, "mlp"), "down": (FF, H, "down")}
ROUNDS = 9
_RESULTS: dict[tuple[str, str], dict] = {}


def _flops() -> float:
    return sum(4 * TOKENS * k * n + 6 * TOKENS * R * (k + n) for k, n, _ in LINEARS.values())


def _peft(base: nn.Linear | nn.Module) -> nn.Module:
    from peft import LoraConfig, LoraModel

    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=P, target_modules=["0"])
    layer = LoraModel(nn.Sequential(base), cfg, "default").model[0]
    for name, prm in layer.named_parameters():
        if "lora_" in name:  # get_peft_model's autocast_adapter_dtype: fp32 adapters on a 16-bit base
            prm.data = prm.data.float()
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)
    return layer.train()


def _nf4_base(k: int, n: int) -> nn.Module:
    import bitsandbytes as bnb

    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(n, k).mul_(k**-0.5).bfloat16(), requires_grad=False,
                                   quant_type="nf4")
    return lin.to("cpu")


def _layers(impl: str, base: str) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    layers = {}
    for name, (k, n, _) in LINEARS.items():
        if base == "nf4" and impl == "peft":
            layers[name] = _peft(_nf4_base(k, n))
            continue
        lin = nn.Linear(k, n, bias=False, dtype=torch.bfloat16).requires_grad_(False)
        if base == "nf4":
            from sftfuse.modules.linear import NF4Linear

            lin = NF4Linear.from_linear(lin, compute_dtype=torch.bfloat16)
        if impl == "base":
            layers[name] = lin
        elif impl == "peft":
            layers[name] = _peft(lin)
        else:
            m = LoRALinear.from_linear(lin, r=R, lora_alpha=ALPHA, lora_dropout=P)
            with torch.no_grad():
                m.lora_B.normal_(0, 0.02)
            layers[name] = m.train()
    return layers


def _step_fn(layers):
    torch.manual_seed(1)
    xs = {g: torch.randn(TOKENS, k, dtype=torch.bfloat16, requires_grad=True) for k, _, g in LINEARS.values()}
    dys = {name: torch.randn(TOKENS, n, dtype=torch.bfloat16) for name, (_, n, _) in LINEARS.items()}

    def forward():
        return {name: layers[name](xs[g]) for name, (_, _, g) in LINEARS.items()}

    def step():
        ys = forward()
        torch.autograd.backward([ys[n] for n in LINEARS], [dys[n] for n in LINEARS])
        for x in xs.values():
            x.grad = None
        for m in layers.values():
            m.zero_grad(set_to_none=True)

    return forward, step


def _saved_bytes(layers, forward) -> int:
    params = {p.untyped_storage().data_ptr() for m in layers.values() for p in [*m.parameters(), *m.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ys = forward()
    del ys
    return sum(seen.values())


@pytest.mark.parametrize("base", ["bf16", "nf4"])
@pytest.mark.parametrize("impl", ["base", "peft", "sftfuse"])  # baselines first
def test_lora_block(benchmark, bench_record, impl, base):
    if base == "nf4" and impl != "peft":
        pytest.importorskip("sftfuse.kernels.nf4", reason="NF4 base needs sftfuse.kernels.nf4")
    layers = _layers(impl, base)
    forward, step = _step_fn(layers)
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    sec = benchmark.stats.stats.median
    row = {"base": base, "impl": impl, "adapter dtype": "-" if impl == "base" else
           ("fp32" if impl == "peft" else "bf16"), "fwd+bwd ms": sec * 1e3,
           "min ms": benchmark.stats.stats.min * 1e3,
           "GFLOP/s": _flops() / sec / 1e9, "x floor": x_floor(sec, _flops()),
           "saved MB": _saved_bytes(layers, forward) / 2**20,
           "peak MB": peak_memory(step) / 2**20}
    benchmark.extra_info.update({k: v for k, v in row.items() if not isinstance(v, str)})
    _RESULTS[(base, impl)] = row


@pytest.mark.parametrize("base", ["bf16", "nf4"])
def test_lora_interleaved(base):
    """Ratios from interleaved rounds: each round times base, PEFT and sftfuse back to back (rotating order), so
    a load change on a shared CPU hits all three; the reported ratio is the median of the per-round ratios."""
    if base == "nf4":
        pytest.importorskip("sftfuse.kernels.nf4", reason="NF4 base needs sftfuse.kernels.nf4")
    impls = ("base", "peft", "sftfuse")
    steps = {impl: _step_fn(_layers(impl, base))[1] for impl in impls}
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for step in steps.values():
        step()
    for i in range(ROUNDS):
        for impl in impls[i % 3:] + impls[: i % 3]:
            t0 = time.perf_counter()
            steps[impl]()
            times[impl].append(time.perf_counter() - t0)
    for impl in impls:
        ratios = sorted(a / b for a, b in zip(times[impl], times["peft"], strict=True))
        row = _RESULTS.setdefault((base, impl), {"base": base, "impl": impl})
        row["interleaved ms"] = sorted(times[impl])[ROUNDS // 2] * 1e3
        row["interleaved time / peft"] = ratios[ROUNDS // 2]
        row["interleaved x floor"] = x_floor(row["interleaved ms"] / 1e3, _flops())


def test_lora_ratios(bench_record):
    """Ratios to PEFT from the same run (the acceptance: time <= 0.4x, saved activations <= 0.6x, bf16 base)."""
    if not _RESULTS:
        pytest.skip("run with the benchmarks")
    for (base, _impl), row in _RESULTS.items():
        peft = _RESULTS.get((base, "peft"))
        if peft and "fwd+bwd ms" in row and "fwd+bwd ms" in peft:  # the timed tests ran too (not only interleaved)
            row["time / peft"] = row["fwd+bwd ms"] / peft["fwd+bwd ms"]
            row["saved / peft"] = row["saved MB"] / peft["saved MB"]
        bench_record("lora", row)
