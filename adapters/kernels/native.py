"""Building the C kernels (`cpu_lowrank.c` here, `server/forward/cpu_attention.c`) on first use, and the OpenMP
runtime they share with torch.

A source is compiled with the system's C compiler (`cc`, or $CC) into a per-user cache, keyed by the source, the
compiler and the OpenMP runtime, so a changed source or compiler builds again and concurrent builds are safe.
The library's OpenMP is torch's own: it is linked against the libgomp that torch has loaded into the process
(whatever its file name), not the compiler's, so a kernel runs on the calling (engine) thread's pool. Two OpenMP
runtimes would keep two pools of threads spinning on the same cores.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .reference import relative_error

# -ffp-contract=off: every multiply and add rounds on its own. GCC's default lets it fuse some of them into FMAs in
# one loop and not in another: on a Sapphire Rapids host the grouped kernel's tiles of 4 and of 1 row then rounded
# differently, and a row's bits depended on the rest of its batch. Measured cost on 2 znver3 cores: within noise.
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC")
log = logging.getLogger(__name__)


def load(source: Path, what: str, instead: str) -> ctypes.CDLL | None:
    """The library built from `source`; None, after a warning naming `what` and what serves `instead`, where it
    cannot be built or loaded."""
    try:
        return ctypes.CDLL(str(build(source)))
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        log.warning("%s is not available (%s): %s", what, exc, instead)
        return None


def agrees(what: str, got: torch.Tensor, want: torch.Tensor, tolerance: float = 1e-4) -> bool:
    """A kernel's first-use check: whether `got` is within `tolerance` of its torch path's `want` (relative to
    max |want|). A miscompiled kernel costs one warning naming `what` and the torch path, never a wrong output."""
    error = relative_error(got, want)
    if error > tolerance:
        log.warning("%s differs from the torch path (relative error %.2g): using torch", what, error)
    return error <= tolerance


def loaded_openmp_runtimes() -> list[str]:
    """Paths of the libgomp libraries mapped into this process, sorted (from /proc/self/maps: Linux only; an
    empty list elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return []
    return sorted(path for path in paths if os.path.basename(path).startswith("libgomp"))


def build(source: Path) -> Path:
    """Compile `source` into the cache (once per source, compiler and OpenMP runtime) and return the library's
    path. Raises RuntimeError (no compiler, or it failed) or OSError."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or $CC) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    runtime = loaded_openmp_runtimes()[:1]
    key = hashlib.sha256("\0".join([source.read_text(), compiler, version, *FLAGS, *runtime]).encode()).hexdigest()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraplex" / "kernels"
    target = cache / f"{source.stem}-{key[:16]}.so"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then renamed: concurrent builds are safe
        built, obj = Path(tmp) / target.name, Path(tmp) / f"{source.stem}.o"
        # -fopenmp at the link would add the compiler's own -lgomp: with a runtime loaded, link against it instead
        link = [str(obj), *runtime, f"-Wl,-rpath,{Path(runtime[0]).parent}"] if runtime else [str(obj), "-fopenmp"]
        for command in ([compiler, *FLAGS, "-c", str(source), "-o", str(obj)],
                        [compiler, "-shared", *link, "-o", str(built)]):
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target
