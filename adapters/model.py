"""`AdaptedModel`: a Hugging Face causal LM whose linear layers serve many adapters in one forward pass."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .base import Adapter, BoundAdapter
from .context import BatchContext
from .errors import UnsupportedAdapterError
from .grouped import LowRankStacks
from .linear import LINEAR_TYPES, AdaptedLinear, LinearSpec, base_weight


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
        self._stacks: OrderedDict[tuple[tuple[int, int], ...], LowRankStacks] = OrderedDict()
        self.layers = _inject(model, lambda: self._context)
        if not self.layers:
            raise UnsupportedAdapterError(f"{type(model).__name__} has no linear layers that adapters can target")
        self.specs: dict[str, LinearSpec] = {name: layer.spec() for name, layer in self.layers.items()}

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
                                     self._stacks_for if self.stacked else None)
        self._context = ctx
        try:
            yield ctx
        finally:
            self._context = None

    def _stacks_for(self, members: tuple[tuple[BoundAdapter, int], ...]) -> LowRankStacks:
        """Stacked factors for this batch composition, reused while it lasts (a few compositions kept:
        decode steps repeat one; each holds a copy of its adapters' factors)."""
        key = tuple((bound.serial, task) for bound, task in members)
        stacks = self._stacks.get(key)
        if stacks is None:
            stacks = self._stacks[key] = LowRankStacks(members, len(self.layers))
            while len(self._stacks) > 2:
                self._stacks.popitem(last=False)
        self._stacks.move_to_end(key)
        return stacks

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
