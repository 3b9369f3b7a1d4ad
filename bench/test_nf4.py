"""NF4 matmul forward + backward at SmolLM2-135M's layer shapes, and the bytes of the quantized model.

Per shape (out x in), 1024 tokens, bf16, one test times three implementations on the same inputs:
- `bf16`: F.linear on the unquantized bf16 weight (forward, then dx = dy @ W): the speed target (<= 1.5x).
- `bnb`: bitsandbytes' CPU path, `bnb.matmul_4bit` (dequantizes the whole weight in forward and backward).
- `sftfuse`: `nf4_matmul` (PyTorch path on CPU: row tiles through the byte -> pair table).
FLOPs: forward 2*M*N*K + backward (dx only, the weight is frozen) 2*M*N*K = 4*M*N*K.
Weight bytes read per call: bf16 2*N*K twice; NF4 (0.5 + 1/64 + 4/16384)*N*K twice.
Run: `python -m pytest bench/test_nf4.py`; table in bench/results/nf4.md.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import peak_memory, x_floor

from sftfuse.kernels.nf4 import quantize_nf4
from sftfuse.ops.nf4 import nf4_matmul

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except Exception:  # noqa: BLE001 - bitsandbytes is an optional baseline
    bnb = bnbF = None

TOKENS = 1024
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down projections (out, in)
ROUNDS = 9


def _median_time(fn, rounds=ROUNDS) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_nf4_matmul_fwd_bwd(benchmark, bench_record, shape):
    n, k = shape
    dtype = torch.bfloat16
    w = (torch.randn(n, k) * 0.02).to(dtype)
    x = torch.randn(TOKENS, k, dtype=dtype, requires_grad=True)
    dy = torch.randn(TOKENS, n, dtype=dtype)
    q = quantize_nf4(w)

    def bf16():
        return torch.autograd.grad(F.linear(x, w), x, dy)

    def ours():
        return torch.autograd.grad(nf4_matmul(x, q), x, dy)

    impls = {"bf16": bf16, "sftfuse": ours}
    if bnb is not None:
        packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

        def bnb_path():
            return torch.autograd.grad(bnb.matmul_4bit(x, packed.t(), quant_state=state), x, dy)

        impls = {"bf16": bf16, "bnb": bnb_path, "sftfuse": ours}
    # interleave the implementations round by round: other processes share this CPU, so drift hits all alike
    times = {name: [] for name in impls}
    for fn in impls.values():
        fn()
    for _ in range(ROUNDS):
        for name, fn in impls.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    benchmark.pedantic(ours, rounds=3, warmup_rounds=1, iterations=1)
    flops = 4 * TOKENS * n * k
    for name, fn in impls.items():
        row = {"shape": f"{n}x{k}", "tokens": TOKENS, "impl": name, "ms": med[name] * 1e3,
               "GFLOP/s": flops / med[name] / 1e9, "x floor": x_floor(med[name], flops),
               "peak MB": peak_memory(fn) / 2**20,
               "x bf16": med[name] / med["bf16"]}
        if "bnb" in med:
            row["x bnb"] = med[name] / med["bnb"]
        bench_record("nf4", row)
    benchmark.extra_info.update({f"{name}_ms": v * 1e3 for name, v in med.items()})


def test_quantized_smollm2_bytes(bench_record):
    """Bytes of SmolLM2-135M's linears (all but the tied embedding/head): bf16 vs NF4 with double quant."""
    from torch import nn

    from sftfuse.modules.linear import NF4Linear
    from sftfuse.modules.quantize import quantize_model
    from sftfuse.train.models import load_default_model

    try:
        model, _ = load_default_model(dtype=torch.bfloat16)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    linears = [m for m in model.modules() if type(m) is nn.Linear and m.weight.data_ptr()
               != model.get_input_embeddings().weight.data_ptr()]
    bf16_bytes = sum(m.weight.numel() * 2 + (m.bias.numel() * 2 if m.bias is not None else 0) for m in linears)
    t = time.perf_counter()
    quantize_model(model, compute_dtype=torch.bfloat16)
    seconds = time.perf_counter() - t
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    nf4_bytes = sum(sum(b.numel() * b.element_size() for b in m.buffers()) + sum(
        p.numel() * p.element_size() for p in m.parameters()) for m in nf4)
    ratio = nf4_bytes / bf16_bytes
    bench_record("nf4", {"shape": f"SmolLM2-135M, {len(nf4)} linears", "impl": "model bytes",
                         "bf16 MB": bf16_bytes / 2**20, "nf4 MB": nf4_bytes / 2**20, "nf4/bf16": ratio,
                         "quantize s": seconds})
    assert len(nf4) == len(linears) == 30 * 7
    assert ratio <= 0.35
