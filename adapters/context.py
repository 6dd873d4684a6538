"""Per-step batch context: which rows of the flattened activations belong to which adapter and task.

A forward pass sees activations of shape [..., d]; flattened they are [rows, d]. The engine describes
once per step which sequence owns which rows and with which (bound adapter, task); every adapted layer
then reuses the same grouping. Rows with no adapter are in no group and pay nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import kernels
from .grouped import MAX_GROUP_ROWS, StackRun, add_stacked_deltas, plan_runs
from .kernels import cpu as cpu_kernel

if TYPE_CHECKING:
    from .base import BoundAdapter
    from .factor_pool import FactorPool

Rows = slice | torch.Tensor  # a contiguous range, or a LongTensor of row indices


@dataclass(frozen=True)
class RowGroup:
    """All rows served by one (adapter, task)."""

    adapter: "BoundAdapter"
    task: int
    rows: Rows
    num_rows: int
    prompt: bool = False  # the rows of sequences with more than one row this pass (a low-rank adapter's only)


@dataclass(frozen=True)
class StackedGroups:
    """Groups served together from their slots of the factor pool (grouped.py) instead of one by one."""

    pool: "FactorPool"
    runs: tuple[StackRun, ...]  # the torch path's layout, built with the context (before the forward)
    slot_rows: tuple[tuple[int, torch.Tensor], ...]  # (slot, its rows on the CPU) per group
    num_rows: int
    device: torch.device | str

    @functools.cached_property
    def slot_index(self) -> torch.Tensor:
        """[num_rows] int32: each row's slot, -1 where none (the Triton kernels' layout; built only if they
        run)."""
        index = torch.full((self.num_rows,), -1, dtype=torch.int32)
        for slot, rows in self.slot_rows:
            index[rows] = slot
        return index.to(self.device)

    @functools.cached_property
    def group_layout(self) -> cpu_kernel.GroupLayout:
        """The C kernel's layout: every group's slot and rows (built only if it runs)."""
        return cpu_kernel.GroupLayout.build(self.slot_rows)

    def add_deltas(self, module: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out [n, d_out] += the stacked groups' deltas of `module` for x [n, d_in], in place."""
        factors = self.pool.factors(module)
        if factors is None:
            return
        if kernels.uses_triton(x):
            kernels.lowrank_delta(x, self.slot_index, *factors, out)
        elif cpu_kernel.usable(x, out, factors):
            cpu_kernel.lowrank_delta(x, out, factors, self.group_layout,
                                     lambda into: add_stacked_deltas(into, x, factors, self.runs))
        else:
            add_stacked_deltas(out, x, factors, self.runs)


@dataclass(frozen=True)
class IndexedRows:
    """Every row served from the factor-pool slot in `slot_index` ([n] long on the device, -1 for none) by one
    grouped-kernel call per module. Nothing about the rows is planned on the host, so a CUDA graph that recorded
    these launches serves any mix of adapters (server/forward/graphs.py)."""

    pool: "FactorPool"
    slot_index: torch.Tensor
    backend: str = "triton"  # "torch": the plain-torch reference (not capturable; the graphs' CPU test path)

    def add_deltas(self, module: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out [n, d_out] += each row's delta of `module` for x [n, d_in], in place."""
        factors = self.pool.factors(module)
        if factors is not None:
            kernels.lowrank_delta(x, self.slot_index, *factors, out, backend=self.backend)


@dataclass(frozen=True)
class BatchContext:
    """The grouping of one forward pass's rows by (adapter, task)."""

    num_rows: int
    groups: tuple[RowGroup, ...]  # served one group at a time
    # per-sequence assignment, kept for merge checks and diagnostics
    assignments: tuple[tuple["BoundAdapter | None", int], ...]
    stacked: StackedGroups | IndexedRows | None = None  # many small low-rank groups, served in one batched matmul

    @property
    def empty(self) -> bool:
        return not self.groups and self.stacked is None

    @staticmethod
    def build(
        assignments: Sequence[tuple["BoundAdapter | None", int]],
        rows_per_sequence: int | Sequence[int],
        device: torch.device | str = "cpu",
        pool: "FactorPool | None" = None,
    ) -> "BatchContext":
        """Group rows by (adapter, task).

        assignments: one (bound adapter or None for the base model, task index) per sequence.
        rows_per_sequence: an int for a padded [batch, seq] layout (every sequence owns seq rows),
            or one length per sequence for a packed layout; sequences own consecutive rows in order.
        pool: when given, two or more small groups of `stackable` adapters are served together from their
            slots of this factor pool (grouped.py).
        """
        n = len(assignments)
        lengths = [rows_per_sequence] * n if isinstance(rows_per_sequence, int) else list(rows_per_sequence)
        if len(lengths) != n:
            raise ValueError(f"{n} assignments but {len(lengths)} sequence lengths")
        spans: dict[tuple[int, int], list[tuple[int, int]]] = {}
        owners: dict[tuple[int, int], "BoundAdapter"] = {}
        start = 0
        for (adapter, task), length in zip(assignments, lengths):
            if adapter is not None and length > 0:
                task = adapter.check_task(task)
                # a low-rank adapter's prompts and its decode rows are two groups: the grouped path stacks them
                # apart (its delta is row by row, so the split changes no value)
                key = (id(adapter), task if adapter.task_sensitive else 0, adapter.stackable and length > 1)
                owners[key] = adapter
                spans.setdefault(key, []).append((start, start + length))
            start += length
        groups = [
            RowGroup(owners[key], key[1], _rows(ranges, device), sum(e - s for s, e in ranges), key[2])
            for key, ranges in spans.items()
        ]
        stacked = None
        if pool is not None and not torch.is_grad_enabled():
            stacked, chosen = _stack(groups, pool, device, start)
            served = {id(g) for g in chosen}
            groups = [g for g in groups if id(g) not in served]
        return BatchContext(start, tuple(groups), tuple(assignments), stacked)


def _lowrank(group: RowGroup) -> bool:
    return group.adapter.stackable and not group.adapter.dropout


def _stack(groups: list[RowGroup], pool: "FactorPool", device: torch.device | str,
           num_rows: int) -> tuple[StackedGroups | None, list[RowGroup]]:
    """The stacked groups of an inference step, and the groups they serve.

    Small low-rank groups of decode rows (also beside a prompt) are stacked when there are several. Prompts are
    stacked only where they form a block (equal prompts of adapters in consecutive slots, in slot order: the
    engine's order), viewed in place: a padded copy of hundreds of prompt rows costs more than the per-group
    loop's large matmuls (BENCHMARKS.md)."""
    small = [g for g in groups if _lowrank(g) and not g.prompt and g.num_rows <= MAX_GROUP_ROWS]
    large = [g for g in groups if _lowrank(g) and g.prompt]
    runs: list[StackRun] = []
    chosen: list[tuple[RowGroup, int, torch.Tensor]] = []  # (group, slot, rows on the CPU)
    for part, blocks_only in ((small, False), (large, True)):
        if len(part) < 2:
            continue
        slotted = [(g, pool.slot(g.adapter, g.task), _cpu_rows(g.rows)) for g in part]
        for run in plan_runs([(slot, rows) for _, slot, rows in slotted], device):
            if blocks_only and (run.plan.block_start is None or run.plan.groups < 2):
                continue  # served by the loop
            runs.append(run)
            chosen.extend(c for c in slotted if run.lo <= c[1] < run.hi)
    if not runs:
        return None, []
    stacked = StackedGroups(pool, tuple(runs), tuple((slot, rows) for _, slot, rows in chosen), num_rows, device)
    return stacked, [g for g, _, _ in chosen]


def _cpu_rows(rows: Rows) -> torch.Tensor:
    return torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows.cpu()


def _rows(ranges: list[tuple[int, int]], device: torch.device | str) -> Rows:
    merged: list[tuple[int, int]] = []
    for s, e in ranges:
        if merged and merged[-1][1] == s:
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    if len(merged) == 1:
        return slice(*merged[0])
    return torch.cat([torch.arange(s, e) for s, e in merged]).to(device)
