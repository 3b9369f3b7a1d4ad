"""What sftfuse writes to disk, and how: directories it owns, whole-or-nothing replacement, fsync, a full disk.

Ownership. Every directory sftfuse fills (a run's `output_dir`, `adapter/`, `best_adapter/`, `checkpoints/step-N`,
a merged model) carries a marker file, `.sftfuse-output`; a directory replaced whole also lists its entries in it.
A writer replaces a directory only when it is sftfuse's own and holds nothing else (`is_ours`), or when the user
said `--overwrite`; a run's `output_dir` is locked for the run (`claim_run_dir`, fcntl.flock, released by the
kernel when the process dies, so a SIGKILL leaves no stale lock).

Replacement. A directory is filled in a `.tmp-<name>-<pid>-<random>` sibling, every file and directory in it is
fsynced, and it is swapped with the target by `renameat2(RENAME_EXCHANGE)` (Linux >= 3.15, one atomic step: the
target never goes missing) or, where the filesystem lacks it, by two renames through `.old-<name>-<pid>-<random>`;
the parent directory is fsynced after. Debris of killed processes (`.tmp-*`, `.old-*` whose pid is gone) is removed
by `clean_stale`. After a power loss a renamed directory therefore holds whole files, never empty ones.

A full disk (ENOSPC, EFBIG under RLIMIT_FSIZE, EDQUOT, or what torch and safetensors make of them) becomes a
`DiskFullError` naming the file; the temporary directory is removed and the previous version stays whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import io
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from pathlib import Path

MARKER = ".sftfuse-output"
LOCK = ".sftfuse.lock"
# What a run writes into its output_dir; `--overwrite` removes these (and nothing else) before a fresh run.
RUN_DIRS = ("checkpoints", "adapter", "best_adapter")
RUN_FILES = ("metrics.jsonl", "results.json", "report.md", "loss_curve.png", "base_eval.json", "data_report.md",
             "data_report.json")
_OUR_FILES_RE = re.compile(r"^(adapter_config\.json|adapter_model\.safetensors|training_base\.json|optim\.pt"
                           r"|state\.json|rng-\d+\.pt)$")
_DEBRIS_RE = re.compile(r"^\.(?:tmp|old)-.+-(\d+)-[a-z0-9_]{8}$")
_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# How torch's zip writer and safetensors' Rust writer report a failed write; they keep no errno.
_FULL_TEXT = ("unexpected pos", "No space left", "File too large", "Disk quota exceeded", "os error 28",
              "os error 27", "os error 122")


class RunError(Exception):
    """A run or a command stopped for a reason the user can act on; the CLI prints it as one line."""


class OutputError(RunError):
    """An output directory that is not this run's to write (another run's, a file, someone else's files)."""


class DiskFullError(RunError):
    """The disk (or a quota, or RLIMIT_FSIZE) ran out while writing a file."""


# ================================================================================================ files and fsync
def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    return any(t in str(exc) for t in _FULL_TEXT)


@contextlib.contextmanager
def disk_errors(path):
    """Turn a failed write of `path` on a full disk into a DiskFullError naming it; other errors pass."""
    try:
        yield
    except Exception as e:
        if is_disk_full(e):
            raise DiskFullError(f"disk full while writing {path} ({e}); free some space and run again "
                                "(a run continues from its last checkpoint with --resume)") from e
        raise


def fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root) -> None:
    """fsync every file under `root`, then every directory, deepest first (their entries must reach the disk too)."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def write_file(path, data: bytes | str, *, shown=None) -> Path:
    """Write `data` to `path` and fsync it; a full disk raises DiskFullError naming `shown` (default: `path`)."""
    with disk_errors(shown or path), open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def write_atomic(path, data: bytes | str) -> Path:
    """Replace the file `path` whole: write a sibling, fsync, rename, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write_file(tmp, data, shown=path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)
    return path


def json_text(obj, *, indent: int | None = 1) -> str:
    """JSON with NaN and infinities written as null: strict readers (jq, JavaScript) refuse bare NaN. One line, ending
    in a newline, with indent=None."""
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False) + "\n"


def finite_or_none(obj):
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def save_torch(obj, path) -> Path:
    """torch.save through memory, so a failed write is Python's OSError (torch's own writer says 'unexpected pos')."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_file(path, buf.getvalue())


def save_tensors(tensors: dict, path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save

    return write_file(path, save(tensors, metadata=metadata))


# =========================================================================================== owned directories
def _entries(d: Path) -> set[str]:
    return set(os.listdir(d)) - {MARKER, LOCK}


def mark(d: Path, entries=None) -> None:
    """Write the marker into `d`: sftfuse made it. With `entries`, it also lists what sftfuse put there."""
    write_file(d / MARKER, json.dumps({"sftfuse": 1, "entries": sorted(entries) if entries is not None else None}))


def is_ours(d: Path) -> bool:
    """`d` carries sftfuse's marker and, when the marker lists its entries, holds nothing else."""
    try:
        listed = json.loads((d / MARKER).read_text()).get("entries")
    except (OSError, ValueError, AttributeError):
        return False
    return listed is None or _entries(d) <= set(listed)


def check_target(target: Path, *, overwrite: bool) -> None:
    """Refuse to replace `target` unless it is missing, empty, sftfuse's own, or `overwrite` says so."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise OutputError(f"{target} exists and is not a directory; choose another output path")
    if target.is_dir() and _entries(target) and not is_ours(target) and not overwrite:
        extra = sorted(_entries(target))[:3]
        raise OutputError(f"{target} exists and holds files sftfuse did not write ({', '.join(extra)}); choose "
                          "another directory, or pass --overwrite to replace it with everything in it")


def staging_dir(parent: Path, name: str) -> Path:
    """A fresh `.tmp-<name>-<pid>-<random>` directory under `parent` (created if missing) to fill, then move into
    place with `replace_dir`. mkdtemp makes it private (0700); what lands there is an ordinary output, so 0755."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".tmp-{name}-{os.getpid()}-"))
    os.chmod(tmp, 0o755)
    return tmp


def public_files(directory: Path) -> None:
    """Give the regular files directly in `directory` the mode a plain `open` would (0666 less the umask): some
    writers (safetensors' save_file) create theirs 0600, which leaves a model directory unreadable to others."""
    umask = 0o022
    try:  # read, not set and reset: os.umask would change it for the process's other threads meanwhile
        umask = int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    for f in directory.iterdir():
        if f.is_file() and not f.is_symlink():
            os.chmod(f, 0o666 & ~umask)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False where the system or filesystem lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, target: Path, *, overwrite: bool = False) -> Path:
    """Move the filled directory `tmp` onto `target`, whole: at every moment `target` is the old one or the new one.

    Raises:
        OutputError: `target` holds files sftfuse did not write and `overwrite` is false (`tmp` is removed).
    """
    try:
        check_target(target, overwrite=overwrite)
        mark(tmp, _entries(tmp))
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists() and _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # `tmp` now holds the old directory
    elif target.exists():  # two renames: a crash between them leaves the old one whole under `.old-*`
        old = target.with_name(f".old-{target.name}-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    fsync_path(target.parent)
    return target


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(parent: Path) -> list[Path]:
    """Remove the `.tmp-*` / `.old-*` directories and files under `parent` that processes now dead left (named
    `.tmp-<name>-<pid>-<8 random characters>`, as sftfuse names its temporaries). Returns them."""
    gone = []
    for p in parent.iterdir() if parent.is_dir() else []:
        m = _DEBRIS_RE.match(p.name)
        if not m or p.is_symlink() or _pid_alive(int(m.group(1))):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(p)
    return gone


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive flock on the file `path` (created if missing), waiting for it if another process has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ============================================================================================ a run's output_dir
def _removable(d: Path) -> bool:
    """sftfuse's own directory: marked, or (written before markers existed) holding only adapter/checkpoint files."""
    return is_ours(d) or all(_OUR_FILES_RE.match(n) for n in _entries(d))


def earlier_results(out: Path) -> list[str]:
    """What an earlier run left in `out` that a fresh run would overwrite or collide with."""
    found = []
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir()):
        found.append("checkpoints/")
    found += [f"{d}/" for d in RUN_DIRS[1:] if (out / d).exists()]
    if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size:
        found.append("metrics.jsonl")
    return found


def remove_run_outputs(out: Path) -> None:
    """`--overwrite`: remove what an earlier run wrote into `out` (RUN_DIRS, RUN_FILES) and nothing else."""
    ckpts = out / "checkpoints"
    doomed = [p for p in ckpts.iterdir() if p.name.startswith(("step-", ".tmp-", ".old-"))] if ckpts.is_dir() else []
    doomed += [out / d for d in RUN_DIRS[1:] if (out / d).exists()]
    foreign = [p for p in doomed if p.is_symlink() or not p.is_dir() or not _removable(p)]
    if foreign:
        raise OutputError(f"{foreign[0]} holds files sftfuse did not write; move them out of {out} first")
    for p in doomed:
        shutil.rmtree(p)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def _lock(out: Path) -> int:
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
        os.close(fd)
        raise OutputError(f"output_dir {out} is in use by another sftfuse run ({holder}); wait for it to end or "
                          "choose another output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def claim_run_dir(out: Path, *, resume: bool, overwrite: bool) -> int:
    """Make `out` this run's: create and mark it, lock it for the run, and clean what killed runs left.

    Returns the lock's file descriptor (close it to release the lock; the kernel releases it when the process dies).

    Raises:
        OutputError: `out` is a file; holds files sftfuse did not write (without `overwrite`); is locked by a live
            run; or holds an earlier run's results without `resume` or `overwrite`.
    """
    if resume and overwrite:
        raise OutputError("--resume continues the run in output_dir and --overwrite discards it: pass only one")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output_dir {out} is a file, not a directory; choose another output_dir")
    legacy = (out / "checkpoints").is_dir() or (out / "metrics.jsonl").is_file()  # a run from before markers
    run_dir = (out / MARKER).exists() or legacy
    if out.is_dir() and _entries(out) and not run_dir and not overwrite:
        extra = ", ".join(sorted(_entries(out))[:3])
        raise OutputError(f"output_dir {out} holds files sftfuse did not write ({extra}); choose a new or empty "
                          "directory, or pass --overwrite to write this run into it (only sftfuse's files change)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output_dir {out}: {e.strerror}") from None
    fd = _lock(out)
    try:
        earlier = earlier_results(out) if run_dir else []
        if earlier and not resume and not overwrite:
            raise OutputError(f"output_dir {out} holds an earlier run ({', '.join(earlier)}): pass --resume to "
                              "continue it, --overwrite to replace it, or choose another output_dir")
        if earlier and overwrite:
            remove_run_outputs(out)
        if not (out / MARKER).exists():
            mark(out)
        for d in RUN_DIRS[1:]:  # adapters written before markers existed: this run may replace them
            if (out / d).is_dir() and not (out / d / MARKER).exists() and _removable(out / d):
                mark(out / d, _entries(out / d))
        for d in (out, out / "checkpoints"):
            clean_stale(d)
    except BaseException:
        os.close(fd)
        raise
    return fd
