"""The NF4 decode of the CPU path as native code (sftfuse/kernels/nf4_decode.c), built at first use.

Why: decoding through torch ops takes three passes over fp32 values (a gather from a byte -> pair table, the
scale, the cast to bf16): 0.51 ms for a (1536 x 576) weight on a 2-core AMD EPYC, where bitsandbytes' native
decode takes 0.09 ms and the (1024-token) GEMM after it 4.1 ms. Done twice per step (forward and backward), that
kept `nf4_matmul` 1.1-1.3x slower than bitsandbytes. The C file does the same arithmetic (fp32 product, one
round-to-nearest-even) in one pass, with AVX-512 where the CPU has it, bit-identical to the PyTorch path: 0.09 ms
for that weight, on torch's own OpenMP threads, and `nf4_matmul` at 0.97-1.02x bitsandbytes' time.

How: the machine's C compiler ($CC, else cc or gcc; Triton needs one too) builds it once with -O3 -march=native
into sftfuse's cache directory ($SFTFUSE_CACHE_DIR, else $XDG_CACHE_HOME/sftfuse, else ~/.cache/sftfuse), under
a name keyed by the source, the compiler and this CPU's flags (a cache shared by two kinds of CPU never loads the
other's build); ctypes loads it, and a call releases the GIL. Without a compiler, or if the build fails, the
PyTorch path runs, with one warning. `SFTFUSE_NATIVE=off` skips the build (the tests run both paths through it).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

CHOICES = ("auto", "off")
_SOURCE = Path(__file__).with_name("nf4_decode.c")
_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c99", "-ffp-contract=off", "-fopenmp")  # no FMA: bit-exact


def _choice() -> str:
    from sftfuse.kernels._registry import env_choice

    return env_choice("SFTFUSE_NATIVE", CHOICES)


def cache_dir() -> Path:
    """Where native builds go: $SFTFUSE_CACHE_DIR, else $XDG_CACHE_HOME/sftfuse, else ~/.cache/sftfuse."""
    if os.environ.get("SFTFUSE_CACHE_DIR"):
        return Path(os.environ["SFTFUSE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sftfuse"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() + platform.machine()


def _build(cc: str) -> Path:
    """The shared library for this source, compiler and CPU, built unless it is cached; raises on failure."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), cc, version, " ".join(_FLAGS), _cpu_flags()]).encode())
    out_dir = cache_dir()
    lib = out_dir / f"nf4_decode-{key.hexdigest()[:20]}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-400:]}")
        os.replace(tmp, lib)  # atomic: a concurrent process loads a whole file or builds its own
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@cache
def _library() -> ctypes.CDLL | None:
    """The built library, loaded once per process (None, warned once, where it cannot be built)."""
    from sftfuse.kernels._registry import warn_once

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        if not cc:
            raise RuntimeError("no C compiler found ($CC, cc, gcc)")
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warn_once("native.build", f"NF4 decode: the native build is unavailable ({err}); the PyTorch path runs")
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.nf4_decode.argtypes = [p, p, p, p, p, ctypes.c_float, p, i64, i64, i64, p, p, ctypes.c_int]
    lib.nf4_decode.restype = None
    lib.nf4_decode_simd.restype = ctypes.c_int
    return lib


def _active() -> ctypes.CDLL | None:
    """The library unless SFTFUSE_NATIVE=off (read per call, so tests switch paths through it)."""
    return None if _choice() == "off" else _library()


def nf4_decode_native():
    """The C function `nf4_decode(packed, scales, absmax, nested_code, nested_absmax, offset, code, first, n,
    blocksize, out_bf16, out_f32, threads)` (nf4_decode.c; pointers as ints, unused ones None), or None where it
    cannot be built or SFTFUSE_NATIVE=off."""
    lib = _active()
    return None if lib is None else lib.nf4_decode


def describe() -> str:
    """One phrase for the CPU plan: which NF4 decode runs here."""
    lib = _active()
    if lib is None:
        return "NF4 decode in torch ops" + (" (SFTFUSE_NATIVE=off)" if _choice() == "off" else " (no native build)")
    return "NF4 decode native" + (" (AVX-512)" if lib.nf4_decode_simd() else " (scalar C)")
