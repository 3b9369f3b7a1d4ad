"""The cost model (`sftfuse.kernels.roofline`) against the kernels it models: the launches it counts are the ones the
launchers issue (kernel, grid, meta-parameters), the compile check builds the divisibility variants those launches
get, and issue 14's cross-entropy claims hold in the model at Llama-3-8B."""

import pytest
import torch

from sftfuse.kernels import cross_entropy_launch as lce
from sftfuse.kernels import cross_entropy_triton as kt
from sftfuse.kernels import roofline
from tests.helpers import randn

_KERNELS = ("_lce_stats_kernel", "_lce_grad_kernel", "_lce_dw_kernel")


class _Recorder:
    """Stands in for a JIT kernel: records (name, grid, meta, args by name) of each launch, then runs it (or not)."""

    def __init__(self, name, real, log, run):
        self.name, self.real, self.log, self.run = name, real, log, run

    def __getitem__(self, grid):
        def launch(*args, **kw):
            named = dict(zip(self.real.arg_names, args))
            self.log.append((self.name, tuple(grid), {k: v for k, v in kw.items()}, named))
            if self.run:
                self.real[grid](*args, **kw)
        return launch


def _record(monkeypatch, run=True):
    log = []
    for name in _KERNELS:
        monkeypatch.setattr(kt, name, _Recorder(name, getattr(kt, name), log, run))
    return log


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("trained", [True, False], ids=["trained", "frozen"])
def test_model_counts_the_launches_the_launcher_issues(monkeypatch, dtype, trained):
    """Interpreter tiles, three row chunks (70 rows in 32s) and several vocabulary slices: every Triton launch of
    `lce_grads_triton`, in order, has the kernel, grid and meta-parameters `roofline.ce_ours` charges for."""
    monkeypatch.setattr(kt, "ROWS_TRAINED", 32)
    monkeypatch.setattr(kt, "ROWS_FROZEN", 32)
    monkeypatch.setattr(kt, "SMS", 3)
    n, V, H = 70, 1031, 64
    log = _record(monkeypatch)
    h, w = randn(n, H, dtype=dtype), randn(V, H, dtype=dtype, scale=0.2)
    y = torch.randint(0, V, (n,))
    lce.lce_grads_triton(h, w, None, y, torch.full((n,), 1 / n), need_dw=trained)
    modelled = [(x["kernel"], tuple(x["grid"]), x["meta"]) for x in
                roofline.ce_ours(n, V, H, dtype, trained=trained, sms=3, interpret=True) if "kernel" in x]
    assert [(k, g, m) for k, g, m, _ in log] == modelled
    assert sum(k == "_lce_stats_kernel" for k, *_ in log) == 3 and log[0][1][0] > 2  # chunks, and slices


def _divisible(named):
    """The arguments Triton's JIT specializes as multiples of 16: integers, and pointers by address."""
    out = set()
    for k, v in named.items():
        if isinstance(v, torch.Tensor):
            if v.data_ptr() % 16 == 0:
                out.add(k)
        elif isinstance(v, int) and not isinstance(v, bool) and v % 16 == 0:
            out.add(k)
    return out


def _params_not_specialized(fn):
    """Names of a kernel's arguments Triton does not specialize (JIT function, or the interpreter's wrapper)."""
    if hasattr(fn, "params"):
        return [p.name for p in fn.params if p.do_not_specialize]
    return list(fn.kwargs.get("do_not_specialize") or [])


def test_compile_check_builds_the_variants_a_real_head_launches(monkeypatch):
    """At the SmolLM2 head (H 576, V 49152, 2 chunks of 1024 rows + 37), the launches' arguments that are multiples
    of 16 are exactly those the compile-check specs declare, except the row and slice counts, which the kernels
    leave unspecialized (one variant for every chunk)."""
    specs = [s for s in kt._specs() if s.name.endswith("bf16")]  # before the kernels are swapped for recorders
    log = _record(monkeypatch, run=False)
    n, V, H = 2 * 1024 + 37, 49152, 576
    monkeypatch.setattr(lce, "_sms", lambda device: 132)
    monkeypatch.setattr(kt, "interpreter_active", lambda: False)  # the GPU plan's tiles
    h, w = torch.randn(n, H).to(torch.bfloat16), torch.randn(V, H).to(torch.bfloat16)
    lce.lce_grads_triton(h, w, None, torch.randint(0, V, (n,)), torch.ones(n), need_dw=True)
    varying = {"n_rows", "tiles_per_split", "splits"}
    seen = set()
    for name, _, meta, named in log:
        spec = next(s for s in specs if s.fn is getattr(kt, name).real)
        assert _divisible(named) - varying == set(spec.divisible), name
        assert varying & set(named) <= set(_params_not_specialized(spec.fn)), name
        consts = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")}
        assert any(s.fn is spec.fn and s.constexprs == consts and s.num_warps == meta["num_warps"]
                   for s in specs), (name, consts)
        seen.add(name)
    assert seen == set(_KERNELS)


def test_cross_entropy_claims_hold_at_llama3_8b():
    """Issue 14: frozen and trained head no slower than Liger FLCE and at most 1.2 x CCE (same model, 8192 tokens);
    and the LoRA / QLoRA lines, from the kernels' plans when they offer one."""
    table = roofline.rows("Llama-3-8B")
    checks = roofline.acceptance(table)
    assert sum("cross-entropy" in c[0] for c in checks) == 4
    assert all(ok for *_, ok in checks), [c for c in checks if not c[3]]


def test_plan_sizes():
    """Every vocabulary slice starts inside V (its first tile sets a finite running max); a chunk's logits fit the
    budget and its rows are whole row blocks; enough programs for every SM."""
    for V, H in ((49152, 576), (128256, 4096), (256000, 2304), (1031, 64)):
        for grads, dw in ((False, False), (True, False), (True, True)):
            pl = kt.lce_plan(8192, V, H, torch.bfloat16, grads=grads, need_dw=dw, interpret=False)
            bn = pl.stats["BLOCK_N"]
            assert (pl.splits - 1) * pl.tiles_per_split * bn < V <= pl.splits * pl.tiles_per_split * bn
            if grads:
                assert pl.rows * V * 4 <= kt.LOGITS_BUDGET and pl.rows % pl.stats["BLOCK_M"] == 0
            assert pl.stats_grid[0] >= min(kt.SMS, -(-V // bn) * -(-pl.rows // pl.stats["BLOCK_M"]))


def test_a_kernels_plan_is_read_when_offered(monkeypatch):
    """The interface for the other ops: a module's `plan` replaces the design, its launches counted as given."""
    from sftfuse.kernels import rms_norm

    fake = {"launches": [{"name": "one pass", "flops": 0, "bytes": 3e9, "atomics": 7, "alu_ops": 1e9, "time_s": 1.0}]}
    monkeypatch.setattr(rms_norm, "plan", lambda M, H, **kw: fake, raising=False)
    launches, source = roofline.rms_norm_ours(8192, 4096)
    assert source == "rms_norm.plan" and len(launches) == 1 and launches[0]["atomics"] == 7
    # timed by this model from its numbers (the module's own time_s is not used), like every peer in the table
    want = 3e9 / roofline.HBM_BW + 1e9 / roofline.ALU_RATE + roofline.LAUNCH_S
    assert launches[0]["time_s"] == pytest.approx(want)


def test_cli_prints_the_table(capsys):
    assert roofline.main([]) == 0
    out = capsys.readouterr().out
    assert "| Llama-3-8B | cross-entropy, trained head" in out and "FAILS" not in out
