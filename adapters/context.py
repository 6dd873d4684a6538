"""Per-step batch context: which rows of the flattened activations belong to which adapter and task.

A forward pass sees activations of shape [..., d]; flattened they are [rows, d]. The engine describes
once per step which sequence owns which rows and with which (bound adapter, task); every adapted layer
then reuses the same grouping. Rows with no adapter are in no group and pay nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .base import BoundAdapter

Rows = slice | torch.Tensor  # a contiguous range, or a LongTensor of row indices


@dataclass(frozen=True)
class RowGroup:
    """All rows served by one (adapter, task)."""

    adapter: "BoundAdapter"
    task: int
    rows: Rows
    num_rows: int


@dataclass(frozen=True)
class BatchContext:
    """The grouping of one forward pass's rows by (adapter, task)."""

    num_rows: int
    groups: tuple[RowGroup, ...]
    # per-sequence assignment, kept for merge checks and diagnostics
    assignments: tuple[tuple["BoundAdapter | None", int], ...]

    @staticmethod
    def build(
        assignments: Sequence[tuple["BoundAdapter | None", int]],
        rows_per_sequence: int | Sequence[int],
        device: torch.device | str = "cpu",
    ) -> "BatchContext":
        """Group rows by (adapter, task).

        assignments: one (bound adapter or None for the base model, task index) per sequence.
        rows_per_sequence: an int for a padded [batch, seq] layout (every sequence owns seq rows),
            or one length per sequence for a packed layout; sequences own consecutive rows in order.
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
                key = (id(adapter), task if adapter.task_sensitive else 0)
                owners[key] = adapter
                spans.setdefault(key, []).append((start, start + length))
            start += length
        groups = tuple(
            RowGroup(owners[key], key[1], _rows(ranges, device), sum(e - s for s, e in ranges))
            for key, ranges in spans.items()
        )
        return BatchContext(num_rows=start, groups=groups, assignments=tuple(assignments))


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
