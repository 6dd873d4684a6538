"""`FactorPool`: the stacked low-rank factors of the grouped path, kept across batch compositions.

The grouped path (grouped.py) reads, per module, A of every group in the batch as [G, r, d_in] and s·B as
[G, d_out, r]. Building those stacks anew for every batch composition copied every factor each time a
request joined or left: a second per composition of 32 adapters on a 2-core CPU, and an eighth of a
1000-adapter Zipf run. Here every (bound adapter, task) that a batch stacks gets one slot, written once, in
one pool per module: A [P, r_max, d_in] and s·B [P, d_out, r_max], zero-padded to the largest rank (exact:
zero columns add nothing). A batch reads views of runs of consecutive slots; the engine orders decode rows
by slot (`slot_of`), so a batch that keeps its adapters is one run and copies nothing.

The tensors are stored transposed, Aᵀ [P, d_in, r] and (s·B)ᵀ [P, r, d_out], and handed out as views of the
shapes above: the grouped path multiplies by Aᵀ and Bᵀ, and on a CPU those `bmm`s run faster on contiguous
operands (at 32 adapters, the adapter work of a decode step took 30-33 ms against 37-44 ms with A and B as
written; bench notes in BENCHMARKS.md). The Triton kernels take any strides.

A slot is given back when its bound adapter is freed (a weak reference: the pool never keeps an unloaded
adapter alive) and is reused, lowest first. Like the KV cache, the pool is sized once and then kept: the
engine reserves as many slots as adapters can be on the device (`reserve`), and the memory is allocated, and
touched, when a batch first stacks, so that neither growth (a copy) nor first-touch page faults (slower
than the copy on a small VM) fall on later steps. It holds one copy of the factors of up to that many
adapters, at the largest rank seen per module. Engine thread only, except the release of a freed adapter's
slots, which any thread may trigger.
"""

from __future__ import annotations

import heapq
import weakref
from collections import deque
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .base import BoundAdapter
    from .linear import LinearSpec

_MIN_CAPACITY = 8


class FactorPool:
    def __init__(self, specs: dict[str, "LinearSpec"]) -> None:
        self.specs = specs
        self._slots: dict[tuple[int, int], int] = {}  # (bound serial, task) -> slot
        self._by_serial: dict[int, list[int]] = {}  # bound serial -> its slots
        self._free: list[int] = []  # a heap of given-back slots below `_used`
        self._used = 0  # slots handed out at least once: [0, _used)
        self._capacity = 0  # slots every module's tensors hold
        self._reserved = 0  # the capacity the first tensors get (`reserve`)
        self._released: deque[int] = deque()  # serials of freed bound adapters (appended from any thread)
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (A, s·B) over all slots
        # bumped whenever a module's tensors are (re)allocated: a CUDA graph that captured their addresses is stale
        self.version = 0

    def __len__(self) -> int:
        """Slots in use."""
        return len(self._slots)

    def slot_of(self, bound: "BoundAdapter", task: int) -> int | None:
        """The slot of (bound, task) if it has one (the engine's row order), else None."""
        return self._slots.get((bound.serial, task))

    def slot(self, bound: "BoundAdapter", task: int) -> int:
        """The slot of (bound, task), written on first use. `bound` must be `stackable`."""
        key = (bound.serial, task)
        slot = self._slots.get(key)
        if slot is not None:
            return slot
        self._reclaim()
        if self._free:
            slot = heapq.heappop(self._free)
        else:
            slot, self._used = self._used, self._used + 1
        if slot >= self._capacity:
            self._grow(max(_MIN_CAPACITY, self._reserved, slot + 1, 2 * self._capacity))
        try:
            self._write(slot, bound, task)
        except BaseException:
            heapq.heappush(self._free, slot)
            raise
        if bound.serial not in self._by_serial:
            self._by_serial[bound.serial] = []
            weakref.finalize(bound, self._released.append, bound.serial)
        self._by_serial[bound.serial].append(slot)
        self._slots[key] = slot
        return slot

    def reserve(self, slots: int) -> None:
        """Make room for `slots` slots when memory is first needed (and now, if some is held already)."""
        self._reserved = slots
        if self._factors and slots > self._capacity:
            self._grow(slots)

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A [P, r, d_in], s·B [P, d_out, r]) of `module` over every slot; None if no slot has the module."""
        return self._factors.get(module)

    # ---- internals
    def _reclaim(self) -> None:
        """Give back the slots of bound adapters freed since the last call."""
        while self._released:
            serial = self._released.popleft()
            for slot in self._by_serial.pop(serial, ()):
                heapq.heappush(self._free, slot)
            self._slots = {k: s for k, s in self._slots.items() if k[0] != serial}

    def _grow(self, capacity: int) -> None:
        """Reallocate every module's tensors to `capacity` slots (a batch's runs index them all alike)."""
        for name, (a, b) in list(self._factors.items()):
            self._factors[name] = _resized(a, b, capacity, a.shape[1])
        self._capacity = capacity
        self.version += 1

    def _write(self, slot: int, bound: "BoundAdapter", task: int) -> None:
        for name in self.specs:
            factors = bound.lowrank_factors(name, task) if name in bound.modules else None
            if factors is None:
                if name in self._factors:  # a reused slot may hold another adapter's factors
                    a_all, b_all = self._factors[name]
                    a_all[slot].zero_()
                    b_all[slot].zero_()
                continue
            a, b, scale = factors  # [r, d_in], [d_out, r]
            rank = a.shape[0]
            if name not in self._factors:  # zeros: the slots written before lack the module
                spec = self.specs[name]
                self._factors[name] = _zeros(a, self._capacity, rank, spec.in_features, spec.out_features)
                self.version += 1
            elif self._factors[name][0].shape[1] < rank:
                self._factors[name] = _resized(*self._factors[name], self._capacity, rank)
                self.version += 1
            a_all, b_all = self._factors[name]
            a_all[slot, :rank] = a
            a_all[slot, rank:] = 0
            b_all[slot, :, :rank] = b * scale
            b_all[slot, :, rank:] = 0


def _zeros(like: torch.Tensor, capacity: int, rank: int, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero A [P, r, d_in] and B [P, d_out, r], as views of contiguous Aᵀ [P, d_in, r] and Bᵀ [P, r, d_out]."""
    return (like.new_zeros(capacity, d_in, rank).transpose(1, 2),
            like.new_zeros(capacity, rank, d_out).transpose(1, 2))


def _resized(a: torch.Tensor, b: torch.Tensor, capacity: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of A [P, r, d_in] and B [P, d_out, r] with `capacity` slots and rank `rank`, zero-padded."""
    new_a, new_b = _zeros(a, capacity, rank, a.shape[2], b.shape[1])
    new_a[: a.shape[0], : a.shape[1]] = a
    new_b[: b.shape[0], :, : b.shape[2]] = b
    return new_a, new_b
