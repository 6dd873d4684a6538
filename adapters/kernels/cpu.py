"""The grouped low-rank delta on the CPU as one compiled call per module (`cpu_lowrank.c`, through ctypes).

The plain-torch path (`grouped.py`) serves a step's groups with two `bmm`s per run of consecutive pool slots,
plus a padded copy of the rows when groups differ in size. In `zipf1000` that is 5 runs and about 25 torch
operations per module in some steps, and the dispatch of those operations cost more than the arithmetic
(BENCHMARKS.md). The C kernel takes every group of the step in one call: each group's rows by index, each
group's factors straight from the pool's storage, no copies.

It is optional at import time and at run time: the source is compiled on first use with the system's C
compiler (`cc`, or $CC) into a per-user cache, keyed by the source and the compiler. Without a compiler, or if
the build or the first-use check against the torch path fails, the torch path serves, after one warning.
float32 on the CPU only. The library's OpenMP is torch's own: it is linked against the libgomp that torch has
loaded into the process (whatever its file name), not the compiler's, so the kernel runs on the calling (engine)
thread's pool. Two OpenMP runtimes would keep two pools of threads spinning on the same cores.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .reference import relative_error

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_lowrank.c")
_enabled = True
_verdict: bool | None = None  # the first-use check against the torch path (None: not run yet)


@dataclass(frozen=True)
class GroupLayout:
    """The groups of a step as the kernel reads them: group g owns rows[offsets[g]:offsets[g + 1]] and slot
    slots[g] of the pool."""

    slots: torch.Tensor  # [G] int32
    offsets: torch.Tensor  # [G + 1] int32
    rows: torch.Tensor  # [V] int32

    @staticmethod
    def build(slot_rows: tuple[tuple[int, torch.Tensor], ...]) -> "GroupLayout":
        sizes = [len(rows) for _, rows in slot_rows]
        offsets = torch.zeros(len(sizes) + 1, dtype=torch.int32)
        offsets[1:] = torch.tensor(sizes, dtype=torch.int32).cumsum(0)
        return GroupLayout(torch.tensor([slot for slot, _ in slot_rows], dtype=torch.int32), offsets,
                           torch.cat([rows for _, rows in slot_rows]).to(torch.int32))


def enable(on: bool) -> None:
    """Let the grouped path use the C kernel on CPU float32 steps (the default), or never."""
    global _enabled
    _enabled = on


def usable(x: torch.Tensor, out: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether `lowrank_delta` can serve these operands: enabled, float32 CPU tensors in the pool's layout,
    the library built, and not found wrong by the first-use check."""
    a, b = factors  # views [P, r, d_in] of Aᵀ [P, d_in, r], [P, d_out, r] of Bᵀ [P, r, d_out]
    return (_enabled and _verdict is not False and x.device.type == "cpu"
            and x.dtype == out.dtype == a.dtype == torch.float32 and x.stride(1) == 1 and out.stride(1) == 1
            and a.transpose(1, 2).is_contiguous() and b.transpose(1, 2).is_contiguous() and a.shape[1] <= _max_rank()
            and _library() is not None)


def lowrank_delta(x: torch.Tensor, out: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor],
                  layout: GroupLayout, reference: Callable[[torch.Tensor], None]) -> None:
    """out [n, d_out] += every group's delta for x [n, d_in], in place (see `usable`). `reference(out)` does the
    same with the torch path: the first call checks the kernel against it, and it serves if the kernel is wrong."""
    global _verdict
    if _verdict is None:
        want, got = out.clone(), out.clone()
        reference(want)
        _call(x, got, factors, layout)
        error = relative_error(got, want)
        _verdict = error <= 1e-4
        if not _verdict:  # a miscompiled kernel costs one warning and the torch path, never a wrong output
            log.warning("the C grouped kernel differs from the torch path (relative error %.2g): using torch", error)
    if _verdict:
        _call(x, out, factors, layout)
    else:
        reference(out)


def _call(x: torch.Tensor, out: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor], layout: GroupLayout) -> None:
    a, b = factors
    _library().lowrank_delta(x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), a.data_ptr(), b.data_ptr(),
                             a.shape[1], x.shape[1], out.shape[1], len(layout.slots), layout.slots.data_ptr(),
                             layout.offsets.data_ptr(), layout.rows.data_ptr())


@functools.cache
def _max_rank() -> int:
    lib = _library()
    return lib.lowrank_max_rank() if lib is not None else 0


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None (after one warning) where it cannot be built."""
    try:
        path = _build()
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        log.warning("the C grouped kernel is not available (%s): the torch path serves multi-adapter steps", exc)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.lowrank_delta.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, ptr, ptr, ptr]
    lib.lowrank_delta.restype = None
    lib.lowrank_max_rank.restype = ctypes.c_int
    return lib


def loaded_openmp_runtimes() -> list[str]:
    """Paths of the libgomp libraries mapped into this process, sorted (from /proc/self/maps: Linux only; an
    empty list elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return []
    return sorted(path for path in paths if os.path.basename(path).startswith("libgomp"))


def _build() -> Path:
    """Compile SOURCE into the cache (once per source, compiler and OpenMP runtime) and return the library's
    path. It is linked against torch's libgomp when one is loaded (see the module's docstring), else against the
    compiler's."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or $CC) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    flags = ["-O3", "-march=native", "-fopenmp", "-fPIC"]
    runtime = loaded_openmp_runtimes()[:1]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *flags, *runtime]).encode()).hexdigest()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraplex" / "kernels"
    target = cache / f"cpu_lowrank-{key[:16]}.so"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then renamed: concurrent builds are safe
        built, obj = Path(tmp) / target.name, Path(tmp) / "cpu_lowrank.o"
        # -fopenmp at the link would add the compiler's own -lgomp: with a runtime loaded, link against it instead
        link = [str(obj), *runtime, f"-Wl,-rpath,{Path(runtime[0]).parent}"] if runtime else [str(obj), "-fopenmp"]
        for command in ([compiler, *flags, "-c", str(SOURCE), "-o", str(obj)],
                        [compiler, "-shared", *link, "-o", str(built)]):
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target
