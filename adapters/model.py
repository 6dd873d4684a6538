"""`AdaptedModel`: a Hugging Face causal LM whose linear layers serve many adapters in one forward pass."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .base import Adapter, BoundAdapter
from .context import BatchContext, IndexedRows
from .errors import UnsupportedAdapterError
from .factor_pool import FactorPool
from .linear import LINEAR_TYPES, AdaptedLinear, LinearSpec, base_weight


_UNSLOTTED = 1 << 62


class AdaptedModel:
    """Wraps every linear layer of `model` (but the output head) in an `AdaptedLinear`.

    Per step: `with adapted.batch(assignments, rows):` run the model's forward; each sequence is served
    through its own (bound adapter, task), or the base model for `None`.
    Hot-swap: `merge(bound, task)` folds one linear adapter into the weights; `unmerge()` restores the
    base exactly, because the base weights are never written (the merged weight is a separate tensor).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        model.requires_grad_(False)  # the base is frozen; otherwise bound factors would carry autograd graphs
        self._context: BatchContext | None = None
        self.merged: tuple[BoundAdapter, int] | None = None
        self.stacked = True  # serve many small low-rank groups through grouped.py (False: one by one)
        self.layers = _inject(model, lambda: self._context)
        if not self.layers:
            raise UnsupportedAdapterError(f"{type(model).__name__} has no linear layers that adapters can target")
        self.specs: dict[str, LinearSpec] = {name: layer.spec() for name, layer in self.layers.items()}
        self.factor_pool = FactorPool(self.specs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def bind(self, adapter: Adapter) -> BoundAdapter:
        """Validate `adapter` against this model and lay it out on the model's device and dtype."""
        return adapter.bind(self.specs, self.device, self.dtype)

    @contextmanager
    def batch(
        self, assignments: Sequence[tuple[BoundAdapter | None, int]], rows_per_sequence: int | Sequence[int]
    ) -> Iterator[BatchContext]:
        """Serve one forward pass: sequence i through assignments[i] = (bound adapter or None, task)."""
        if self.merged is not None:
            if any((a, t) != self.merged for a, t in assignments):
                raise RuntimeError("a merged adapter serves the whole batch; unmerge before mixing adapters")
            ctx = BatchContext(BatchContext.build(assignments, rows_per_sequence).num_rows, (), tuple(assignments))
        else:
            ctx = BatchContext.build(assignments, rows_per_sequence, self.device,
                                     self.factor_pool if self.stacked else None)
        self._context = ctx
        try:
            yield ctx
        finally:
            self._context = None

    @contextmanager
    def indexed(self, slot_index: torch.Tensor, backend: str = "triton") -> Iterator[BatchContext]:
        """Serve one forward pass whose row i uses the factor-pool slot `slot_index[i]` (-1: the base model) through
        the grouped kernels, whatever the rows' adapters: a CUDA graph's decode step (server/forward/graphs.py).
        The slots are taken with `factor_pool.slot` beforehand."""
        if self.merged is not None:
            raise RuntimeError("a merged adapter serves the whole batch; unmerge before serving rows by slot")
        self._context = BatchContext(slot_index.shape[0], (), (), IndexedRows(self.factor_pool, slot_index, backend))
        try:
            yield self._context
        finally:
            self._context = None

    def stack_order(self, bound: BoundAdapter | None, task: int) -> int:
        """Where rows of (bound, task) go in a step for the stacked path to read the fewest runs of the
        factor pool: by slot; rows without one (base model, not stacked yet, other families) after."""
        slot = None
        if bound is not None and bound.stackable:
            slot = self.factor_pool.slot_of(bound, task if bound.task_sensitive else 0)
        return slot if slot is not None else _UNSLOTTED

    @torch.no_grad()
    def merge(self, bound: BoundAdapter, task: int = 0) -> None:
        """Fold ΔW of (bound, task) into the served weights (the base weights stay untouched)."""
        if not bound.mergeable:
            raise UnsupportedAdapterError(f"{bound.adapter.adapter_type} adapters cannot be merged")
        bound.check_task(task)
        self.unmerge()
        merged: dict[str, torch.Tensor] = {}
        for name in bound.modules:
            delta = bound.delta_weight(name, task)
            if delta is not None:
                layer = self.layers[name]
                merged[name] = (base_weight(layer.base).float() + delta).to(self.dtype)
        for name, weight in merged.items():  # all computed first: a failure above changes nothing
            self.layers[name].merged_weight = weight
        self.merged = (bound, task)

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.merged_weight = None
        self.merged = None


def _inject(model: nn.Module, context_source) -> dict[str, AdaptedLinear]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, LINEAR_TYPES) and module is not head and name
    ]
    layers: dict[str, AdaptedLinear] = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = AdaptedLinear(name, module, context_source)
        setattr(parent, child, wrapped)
        layers[name] = wrapped
    return layers
