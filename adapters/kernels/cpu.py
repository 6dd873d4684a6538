"""The grouped low-rank delta on the CPU as one compiled call per module (`cpu_lowrank.c`, through ctypes).

The plain-torch path (`grouped.py`) serves a step's groups with two `bmm`s per run of consecutive pool slots,
plus a padded copy of the rows when groups differ in size. In `zipf1000` that is 5 runs and about 25 torch
operations per module in some steps, and the dispatch of those operations cost more than the arithmetic
(BENCHMARKS.md). The C kernel takes every group of the step in one call: each group's rows by index, each
group's factors straight from the pool's storage, no copies.

It is optional at import time and at run time: the source is compiled on first use (`native.py`, on torch's
OpenMP runtime). Without a compiler, or if the build or the first-use check against the torch path fails, the
torch path serves, after one warning. float32 on the CPU only.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import native

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
        _verdict = native.agrees("the C grouped kernel", got, want)
        out.copy_(got if _verdict else want)
    elif _verdict:
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
    lib = native.load(SOURCE, "the C grouped kernel", "the torch path serves multi-adapter steps")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.lowrank_delta.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, ptr, ptr, ptr]
    lib.lowrank_delta.restype = None
    lib.lowrank_max_rank.restype = ctypes.c_int
    return lib
