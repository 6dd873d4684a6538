"""Grouped low-rank deltas: many small adapter groups in one padded batched matmul (BGMV-style, plain torch).

In a decode step with many adapters each group has a handful of rows, and a loop of two small matmuls per
group and layer costs more in dispatch than in arithmetic. Families whose delta is a low-rank pair
(`BoundAdapter.lowrank_factors`) are instead stacked: per module A [G, r_max, d_in] and s·B [G, d_out, r_max],
zero-padded to the largest rank (exact: zero columns add nothing). Rows are laid out padded per group,
[G, m, d_in], and two `bmm`s serve every group at once. The stacks depend only on which (adapter, task)
pairs are in the batch, so they are cached by that composition across steps. The per-group loop in
`AdaptedLinear` is the reference this path is tested against.

On CUDA with triton importable, `add_grouped_delta` instead runs the BGMV kernels of `kernels/` over the
rows in place, indexed by each row's group (`PaddedRows.index`): no padded copy of the rows. Elsewhere it
runs the two `bmm`s above, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import kernels

if TYPE_CHECKING:
    from .base import BoundAdapter

MAX_MEAN_ROWS = 16  # above this many rows per group (prefill), a per-group loop of large matmuls is faster


@dataclass(frozen=True)
class PaddedRows:
    """Where each group's rows sit in one step: the padded [G, m] layout (bmm path) and, for the kernels,
    each row's group."""

    gather: torch.Tensor  # [G*m] the row read at each padded position (row 0 where padding)
    valid: torch.Tensor  # [V] the padded positions that hold a real row
    rows: torch.Tensor  # [V] the row each valid position writes back to
    groups: int
    width: int  # m
    index: torch.Tensor  # [num_rows] int32: the group of each row, -1 where none (the kernels' layout)
    # when group g owns exactly rows start + g*m ... start + (g+1)*m - 1 (the engine puts decode rows first,
    # grouped; equal groups are common), `start`: then [G, m, d] is a view of the rows and nothing is gathered
    block_start: int | None = None

    @staticmethod
    def build(group_rows: list[torch.Tensor], device: torch.device | str, num_rows: int | None = None) -> "PaddedRows":
        """num_rows: rows of the step (default: up to the last grouped row)."""
        width = max(len(r) for r in group_rows)
        gather = torch.zeros(len(group_rows), width, dtype=torch.long)
        valid, rows = [], []
        for g, r in enumerate(group_rows):
            gather[g, : len(r)] = r
            valid.append(torch.arange(len(r)) + g * width)
            rows.append(r)
        all_rows = torch.cat(rows)
        index = torch.full((int(all_rows.max()) + 1 if num_rows is None else num_rows,), -1, dtype=torch.int32)
        index[all_rows] = torch.cat([torch.full((len(r),), g, dtype=torch.int32) for g, r in enumerate(group_rows)])
        start = int(all_rows[0])
        block = all(len(r) == width for r in group_rows) and torch.equal(
            all_rows, torch.arange(start, start + len(all_rows)))
        return PaddedRows(gather.reshape(-1).to(device), torch.cat(valid).to(device), all_rows.to(device),
                          len(group_rows), width, index.to(device), start if block else None)


class LowRankStacks:
    """Per-module stacked factors of an ordered tuple of (bound adapter, task), built on first use."""

    def __init__(self, members: tuple[tuple["BoundAdapter", int], ...], num_modules: int) -> None:
        self.members = members
        self.num_modules = num_modules
        self._modules: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def get(self, module: str, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if module not in self._modules:
            self._modules[module] = self._stack(module, d_in, d_out)
            if len(self._modules) == self.num_modules:
                self.members = ()  # all built: hold copies only, so unloading an adapter frees it
        return self._modules[module]

    def _stack(self, module: str, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        factors = [bound.lowrank_factors(module, task) for bound, task in self.members]
        present = [f for f in factors if f is not None]
        if not present:
            return None
        a0 = present[0][0]
        r_max = max(a.shape[0] for a, _, _ in present)
        a_stack = torch.zeros(len(factors), r_max, d_in, dtype=a0.dtype, device=a0.device)  # [G, r, d_in]
        b_stack = torch.zeros(len(factors), d_out, r_max, dtype=a0.dtype, device=a0.device)  # [G, d_out, r]
        for g, f in enumerate(factors):
            if f is not None:
                a, b, scale = f
                a_stack[g, : a.shape[0]] = a
                b_stack[g, :, : b.shape[1]] = b * scale
        return a_stack, b_stack


def grouped_delta(x: torch.Tensor, stacks: tuple[torch.Tensor, torch.Tensor], plan: PaddedRows) -> torch.Tensor:
    """Deltas of every stacked group: x [n, d_in] -> [V, d_out], one row per `plan.rows` entry."""
    a_stack, b_stack = stacks
    xp = x.index_select(0, plan.gather).view(plan.groups, plan.width, x.shape[1])  # [G, m, d_in]
    u = torch.bmm(xp, a_stack.transpose(1, 2))  # [G, m, r]
    y = torch.bmm(u, b_stack.transpose(1, 2))  # [G, m, d_out]
    return y.view(-1, y.shape[-1]).index_select(0, plan.valid)  # [V, d_out]


def add_grouped_delta(out: torch.Tensor, x: torch.Tensor, stacks: tuple[torch.Tensor, torch.Tensor],
                      plan: PaddedRows) -> None:
    """out [n, d_out] += the delta of every stacked group, in place: Triton kernels on CUDA when triton is
    importable; else two `bmm`s, straight on views of the rows when they form a block (`PaddedRows.block_start`),
    or over `grouped_delta`'s padded copy."""
    a_stack, b_stack = stacks
    if kernels.uses_triton(x):
        kernels.lowrank_delta(x, plan.index, a_stack, b_stack, out)
    elif plan.block_start is not None and out.dtype == b_stack.dtype and out.is_contiguous():
        rows = slice(plan.block_start, plan.block_start + plan.groups * plan.width)
        u = torch.bmm(x[rows].reshape(plan.groups, plan.width, -1), a_stack.transpose(1, 2))  # [G, m, r]
        out[rows].view(plan.groups, plan.width, -1).baddbmm_(u, b_stack.transpose(1, 2))  # += [G, m, d_out]
    else:
        out.index_add_(0, plan.rows, grouped_delta(x, stacks, plan).to(out.dtype))
