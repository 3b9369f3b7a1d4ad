"""What sftfuse does to directories: replacement without a gap, refusal of others' files, fsync, debris, a full
disk, and the default-model cache under a lock. Adapters here are a few small tensors; `merge` uses the tiny
Llama of conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from sftfuse.train import adapter as ad
from sftfuse.train import checkpoint as ck
from sftfuse.train import outdir as od
from tests.train.common import ENV, ROOT


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{ad.PEFT_PREFIX}m.q.lora_A.weight": torch.randn(2, 8, generator=g),
            f"{ad.PEFT_PREFIX}m.q.lora_B.weight": torch.randn(8, 2, generator=g)}


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_replace_dir_never_leaves_the_target_missing(tmp_path, monkeypatch):
    """After every rename sftfuse makes while replacing an adapter, the adapter directory exists."""
    target = tmp_path / "adapter"
    ad.write_adapter(target, _tensors(0), {"r": 2})
    seen = []
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def watched(src, dst, *a, _real=real, **k):
            _real(src, dst, *a, **k)
            seen.append(target.is_dir())

        monkeypatch.setattr(os, name, watched)
    ad.write_adapter(target, _tensors(1), {"r": 2})
    assert all(seen), seen
    assert torch.equal(ad.read_adapter(target)[0][f"{ad.PEFT_PREFIX}m.q.lora_A.weight"],
                       _tensors(1)[f"{ad.PEFT_PREFIX}m.q.lora_A.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary, no `.old-*`


def test_replace_dir_without_exchange_falls_back_to_two_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(od, "_exchange", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE
    target = tmp_path / "adapter"
    for seed in (0, 1):
        ad.write_adapter(target, _tensors(seed), {"r": seed})
    assert ad.read_adapter(target)[1] == {"r": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_writers_refuse_a_directory_sftfuse_did_not_write(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(od.OutputError, match=r"adapter exists and holds files sftfuse did not write \(notes.txt\)"):
        ad.write_adapter(target, _tensors(), {"r": 2})
    assert (target / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    ad.write_adapter(target, _tensors(), {"r": 2}, overwrite=True)  # the user said so
    ad.write_adapter(target, _tensors(), {"r": 3})  # its own output: replaced without asking
    assert ad.read_adapter(target)[1] == {"r": 3} and not (target / "notes.txt").exists()
    (target / "extra.bin").write_bytes(b"x")  # a file added to sftfuse's output makes it someone else's again
    with pytest.raises(od.OutputError, match="extra.bin"):
        ad.write_adapter(target, _tensors(), {"r": 4})


def _adapter_for(tiny_dir: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ad.inject_lora(model, target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4)
    for mod in ad.lora_modules(model).values():
        torch.nn.init.normal_(mod.lora_B, std=0.02)
    cfg = ad.peft_config(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                         use_rslora=False, base_model=str(tiny_dir))
    return ad.write_adapter(out, ad.adapter_state_dict(model), cfg)


def test_merge_refuses_an_out_dir_holding_other_files(tiny_dir, tmp_path, capsys):
    """`sftfuse merge ADAPTER OUT` used to delete OUT and everything in it, exit 0."""
    from sftfuse.train.cli import main

    adapter = _adapter_for(tiny_dir, tmp_path / "adapter")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["merge", str(adapter), str(out)]) == 1
    assert "holds files sftfuse did not write" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    merged = tmp_path / "merged"
    assert main(["merge", str(adapter), str(merged)]) == 0
    assert main(["merge", str(adapter), str(merged)]) == 0  # its own earlier output is replaced
    assert (merged / "config.json").exists() and (merged / od.MARKER).exists()
    assert main(["merge", str(adapter), str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").exists()
    assert main(["merge", str(adapter), str(tmp_path), "--overwrite"]) == 1  # would replace its own input
    assert "would replace the adapter" in capsys.readouterr().err and (adapter / ad.ADAPTER_WEIGHTS).exists()


def _fsynced(monkeypatch) -> list[str]:
    """Record the path of every descriptor os.fsync is called on."""
    done = []
    real = os.fsync

    def fsync(fd):
        done.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return done


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads descriptors' paths from /proc")
def test_files_and_directories_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    """Every file of an adapter and of a checkpoint, and their directory, reach the disk under the temporary
    name (before the rename), and the parent directory after it: a power loss cannot leave empty files."""
    from tests.train.test_checkpoint import _run, _save

    done = _fsynced(monkeypatch)
    ad.write_adapter(tmp_path / "adapter", _tensors(), {"r": 2})
    tmp = [Path(p) for p in done if Path(p).name.startswith(".tmp-adapter-")]
    assert tmp and {ad.ADAPTER_WEIGHTS, ad.ADAPTER_CONFIG} <= {Path(p).name for p in done if Path(p).parent == tmp[0]}
    assert str(tmp_path) in done
    done.clear()
    model, _params, masters, opt, sched = _run()
    _save(tmp_path / "ckpts", model, masters, opt, sched, step=2)
    tmp = {Path(p).parent for p in done if Path(p).parent.name.startswith(".tmp-step-000002-")}
    assert len(tmp) == 1
    names = {Path(p).name for p in done if Path(p).parent in tmp}
    assert {"optim.pt", "rng-0.pt", "state.json", ad.ADAPTER_WEIGHTS} <= names, names
    assert str(tmp_path / "ckpts") in done


def test_clean_stale_removes_only_what_dead_processes_left(tmp_path):
    dead = _dead_pid()
    names = [f".tmp-adapter-{dead}-abcd1234", f".old-best_adapter-{dead}-abcd_123", f".tmp-step-000004-{dead}-zz99aa00",
             f".tmp-adapter-{os.getpid()}-abcd1234", ".tmp-mine", "old-notes"]
    for n in names:
        (tmp_path / n).mkdir()
    (tmp_path / f".tmp-results.json-{dead}-0123abcd").write_text("{")  # a file written half by `write_atomic`
    gone = od.clean_stale(tmp_path)
    assert sorted(p.name for p in gone) == sorted([*names[:3], f".tmp-results.json-{dead}-0123abcd"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[3:])


DISK_FULL = """
import resource, signal, sys, torch
from pathlib import Path
from sftfuse.train import adapter as ad, outdir as od
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past RLIMIT_FSIZE a write fails with EFBIG
out = Path(sys.argv[1])
big = {ad.PEFT_PREFIX + "m.q.lora_A.weight": torch.ones(64, 1024)}  # 256 KiB
ad.write_adapter(out / "adapter", {k: v[:1] for k, v in big.items()}, {"r": 1})
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))  # the disk fills up
try:
    ad.write_adapter(out / "adapter", big, {"r": 2})
except od.DiskFullError as e:
    print("DISK FULL:", e)
"""


def test_disk_full_while_writing_an_adapter_keeps_the_previous_one(tmp_path):
    res = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path)], env=ENV, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert "DISK FULL: disk full while writing" in res.stdout and ".tmp-adapter-" in res.stdout, res.stderr
    assert ad.read_adapter(tmp_path / "adapter")[1] == {"r": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # the temporary is gone


def test_default_model_cache_is_written_once_under_a_lock(tiny_dir, tmp_path, monkeypatch):
    """Two processes (here threads) loading the default model for the first time at once: one reads the GGUF and
    writes the cache, the other waits for the lock and loads the cache. Unlocked, both read and write it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftfuse.train import models

    monkeypatch.setenv("SFTFUSE_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "gguf_path", lambda: tiny_dir / "fake.gguf")
    reads, second_read = [], threading.Event()
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def model_from(path, *a, gguf_file=None, **k):
        if gguf_file:  # "reading the GGUF": the tiny model; the first reader waits to see whether a second comes
            reads.append(threading.current_thread().name)
            if len(reads) == 1:
                threading.Thread(target=load, name="second").start()
                second_read.wait(timeout=3)
            else:
                second_read.set()
            return real_model(tiny_dir)
        return real_model(path, *a, **k)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model_from)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda p, *a, gguf_file=None, **k: real_tok(
        tiny_dir if gguf_file else p))
    loaded = []

    def load():
        loaded.append(models.load_default_model()[0])

    load()
    for t in threading.enumerate():
        if t.name == "second":
            t.join(timeout=60)
    assert reads == ["MainThread"] and len(loaded) == 2
    assert (tmp_path / "SmolLM2-135M-Instruct" / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_checkpoint_write_refuses_nothing_of_its_own(tmp_path):
    """A resumed run writes `step-N` again where a killed run had written it: its own, so replaced."""
    from tests.train.test_checkpoint import _run, _save

    model, _params, masters, opt, sched = _run()
    for _ in range(2):
        path = _save(tmp_path, model, masters, opt, sched, step=4)
    assert ck.latest_checkpoint(tmp_path) == path and od.is_ours(path)
