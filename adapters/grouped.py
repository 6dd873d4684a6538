"""Grouped low-rank deltas: many small adapter groups in one padded batched matmul (BGMV-style, plain torch).

In a decode step with many adapters each group has a handful of rows, and a loop of two small matmuls per
group and layer costs more in dispatch than in arithmetic. Families whose delta is a low-rank pair
(`BoundAdapter.lowrank_factors`) are instead served from their slots of the `FactorPool` (A [P, r, d_in],
s·B [P, d_out, r]): rows are laid out padded per group, [G, m, d_in], and two `bmm`s over a view of the
groups' slots serve them all at once. Groups whose slots are not consecutive are served as a few runs
(`plan_runs`); a run whose padding would dwarf its rows keeps a narrower width (`MAX_PADDED_ROWS`). The
per-group loop in `AdaptedLinear` is the reference this path is tested against.

On CUDA with the Triton kernels enabled (serve --grouped-kernels triton), `context.StackedGroups` instead runs the
BGMV kernels of `kernels/` over the rows in place, indexed by each row's slot: no padded copy of the rows, one
launch for every run. On the CPU, by default, it runs the C kernel of `kernels/cpu.py`: one call per module for
every group, by slot and row index. This module is then its oracle and its fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A larger group of decode rows stays on the per-group loop; prompts are stacked only as a block of equal prompts
# (context._stack): a padded copy of their rows costs more than the loop's large matmuls.
MAX_GROUP_ROWS = 16

# A run pads its groups to the widest; with skewed groups (one popular adapter among many singletons) that is
# mostly padding, and on a 2-core CPU a padded layout of 256 or more rows ran 5-10x slower than one of 128
# (BENCHMARKS.md). Past this many padded rows (and unless every group is as wide: no padding), a run keeps its
# width to what fits and serves each group's rows beyond it (`StackRun.overflow`) with two matmuls on its slot.
MAX_PADDED_ROWS = 128


@dataclass(frozen=True)
class PaddedRows:
    """Where each group's rows sit in one step, padded to [G, m] (a group may have no rows)."""

    gather: torch.Tensor  # [G*m] the row read at each padded position (row 0 where padding)
    valid: torch.Tensor  # [V] the padded positions that hold a real row
    rows: torch.Tensor  # [V] the row each valid position writes back to
    groups: int
    width: int  # m
    # when group g owns exactly rows start + g*m ... start + (g+1)*m - 1 (the engine puts decode rows first,
    # grouped; equal groups are common), `start`: then [G, m, d] is a view of the rows and nothing is gathered
    block_start: int | None = None

    @staticmethod
    def build(group_rows: list[torch.Tensor], device: torch.device | str) -> "PaddedRows":
        width = max(len(r) for r in group_rows)
        gather = torch.zeros(len(group_rows), width, dtype=torch.long)
        valid, rows = [], []
        for g, r in enumerate(group_rows):
            gather[g, : len(r)] = r
            valid.append(torch.arange(len(r)) + g * width)
            rows.append(r)
        all_rows = torch.cat(rows)
        start = int(all_rows[0])
        block = all(len(r) == width for r in group_rows) and torch.equal(
            all_rows, torch.arange(start, start + len(all_rows)))
        return PaddedRows(gather.reshape(-1).to(device), torch.cat(valid).to(device), all_rows.to(device),
                          len(group_rows), width, start if block else None)


@dataclass(frozen=True)
class StackRun:
    """Groups in the consecutive slots [lo, hi) of the pool, served by one pair of `bmm`s; the rows past the
    run's width, if any, by two matmuls each (slot, rows)."""

    lo: int
    hi: int
    plan: PaddedRows
    overflow: tuple[tuple[int, slice | torch.Tensor], ...] = ()

    @staticmethod
    def build(slot_rows: list[tuple[int, torch.Tensor]], device: torch.device | str) -> "StackRun":
        """slot_rows: (slot, rows) of consecutive slots, with no slot missing."""
        widest = max(len(rows) for _, rows in slot_rows)
        unpadded = all(len(rows) == widest for _, rows in slot_rows)
        fits = unpadded or len(slot_rows) * widest <= MAX_PADDED_ROWS
        width = widest if fits else max(1, MAX_PADDED_ROWS // len(slot_rows))
        overflow = tuple((slot, _as_rows(rows[width:], device)) for slot, rows in slot_rows if len(rows) > width)
        plan = PaddedRows.build([rows[:width] for _, rows in slot_rows], device)
        return StackRun(slot_rows[0][0], slot_rows[-1][0] + 1, plan, overflow)


def _as_rows(rows: torch.Tensor, device: torch.device | str) -> slice | torch.Tensor:
    """A slice when the rows are consecutive (the engine's decode order), else the index on the device."""
    first = int(rows[0])
    if torch.equal(rows, torch.arange(first, first + len(rows))):
        return slice(first, first + len(rows))
    return rows.to(device)


MAX_GAP = 1  # unused slots inside a run, read for nothing, are cheaper than another pair of bmm calls up to this


def plan_runs(slot_rows: list[tuple[int, torch.Tensor]], device: torch.device | str) -> tuple[StackRun, ...]:
    """Split groups, given as (slot, rows), into runs of nearby slots; a gap of up to MAX_GAP slots stays
    inside a run as groups without rows."""
    slot_rows = sorted(slot_rows, key=lambda p: p[0])
    runs: list[list[tuple[int, torch.Tensor]]] = []
    for slot, rows in slot_rows:
        if runs and slot - runs[-1][-1][0] <= MAX_GAP + 1:
            last = runs[-1][-1][0]
            runs[-1].extend((s, rows[:0]) for s in range(last + 1, slot))
            runs[-1].append((slot, rows))
        else:
            runs.append([(slot, rows)])
    return tuple(StackRun.build(run, device) for run in runs)


def grouped_delta(x: torch.Tensor, stacks: tuple[torch.Tensor, torch.Tensor], plan: PaddedRows) -> torch.Tensor:
    """Deltas of every stacked group: x [n, d_in] -> [V, d_out], one row per `plan.rows` entry."""
    a_stack, b_stack = stacks
    xp = x.index_select(0, plan.gather).view(plan.groups, plan.width, x.shape[1])  # [G, m, d_in]
    u = torch.bmm(xp, a_stack.transpose(1, 2))  # [G, m, r]
    y = torch.bmm(u, b_stack.transpose(1, 2))  # [G, m, d_out]
    return y.view(-1, y.shape[-1]).index_select(0, plan.valid)  # [V, d_out]


def add_stacked_deltas(out: torch.Tensor, x: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor],
                       runs: tuple[StackRun, ...]) -> None:
    """out [n, d_out] += every run's groups' deltas, in place. factors: the pool's (A [P, r, d_in],
    s·B [P, d_out, r])."""
    a_all, b_all = factors
    for run in runs:
        add_grouped_delta(out, x, (a_all[run.lo:run.hi], b_all[run.lo:run.hi]), run.plan)
        for slot, rows in run.overflow:
            delta = ((x[rows] @ a_all[slot].t()) @ b_all[slot].t()).to(out.dtype)  # [k, d_out]
            if isinstance(rows, slice):
                out[rows] += delta
            else:
                out.index_add_(0, rows, delta)


def add_grouped_delta(out: torch.Tensor, x: torch.Tensor, stacks: tuple[torch.Tensor, torch.Tensor],
                      plan: PaddedRows) -> None:
    """out [n, d_out] += the delta of the groups of `plan` (stacks: their A [G, r, d_in], B [G, d_out, r]), in
    place: two `bmm`s, straight on views of the rows when they form a block (`PaddedRows.block_start`), or over
    `grouped_delta`'s padded copy."""
    a_stack, b_stack = stacks
    if plan.block_start is not None and out.dtype == b_stack.dtype and out.is_contiguous():
        rows = slice(plan.block_start, plan.block_start + plan.groups * plan.width)
        u = torch.bmm(x[rows].reshape(plan.groups, plan.width, -1), a_stack.transpose(1, 2))  # [G, m, r]
        out[rows].view(plan.groups, plan.width, -1).baddbmm_(u, b_stack.transpose(1, 2))  # += [G, m, d_out]
    else:
        out.index_add_(0, plan.rows, grouped_delta(x, stacks, plan).to(out.dtype))
