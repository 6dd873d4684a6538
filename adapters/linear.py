"""`AdaptedLinear`: a target linear layer that adds per-row adapter deltas to its base output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

if TYPE_CHECKING:
    from .context import BatchContext

LINEAR_TYPES = (nn.Linear, Conv1D)


@dataclass(frozen=True)
class LinearSpec:
    """What an adapter needs to know about one target layer of the base model."""

    name: str  # module path in the model, e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    weight: Callable[[], torch.Tensor]  # the base weight as [d_out, d_in] (a view; GPT-2 Conv1D is transposed)


def base_weight(module: nn.Module) -> torch.Tensor:
    """The weight of nn.Linear or GPT-2 Conv1D as [d_out, d_in]."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of nn.Linear or Conv1D."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


class AdaptedLinear(nn.Module):
    """Wraps a base linear layer. With no context (or no adapter rows) it costs one branch over the base."""

    def __init__(self, name: str, base: nn.Module, context_source: Callable[[], "BatchContext | None"]) -> None:
        super().__init__()
        self.name = name
        self.base = base
        self.in_features, self.out_features = features(base)
        self._context = context_source
        self.merged_weight: torch.Tensor | None = None  # [d_out, d_in]; set while an adapter is merged

    def spec(self) -> LinearSpec:
        return LinearSpec(self.name, self.in_features, self.out_features, lambda: base_weight(self.base))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_weight is not None:
            out = nn.functional.linear(x, self.merged_weight, self.base.bias)
        else:
            out = self.base(x)
        ctx = self._context()
        if ctx is None or ctx.empty:
            return out
        x2 = x.reshape(-1, self.in_features)  # [rows, d_in]
        if x2.shape[0] != ctx.num_rows:
            raise RuntimeError(f"{self.name}: batch context describes {ctx.num_rows} rows, activations have {x2.shape[0]}")
        out2 = out.reshape(-1, self.out_features)  # [rows, d_out]
        grad = torch.is_grad_enabled()
        for group in ctx.groups:
            xs, hs = x2[group.rows], out2[group.rows]
            delta = group.adapter.delta(self.name, xs, hs, group.task)
            if delta is None:
                continue
            delta = delta.to(out2.dtype)
            if isinstance(group.rows, slice) and not grad:
                out2[group.rows] += delta
            elif grad:  # out of place, so that autograd keeps the values it saved
                out2 = out2.index_add(0, _as_index(group.rows, out2.device), delta)
            else:
                out2.index_add_(0, group.rows, delta)
        if ctx.stacked is not None:  # inference only, so in place
            ctx.stacked.add_deltas(self.name, x2, out2)
        return out2.view(out.shape)


def _as_index(rows: slice | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.arange(rows.start, rows.stop, device=device) if isinstance(rows, slice) else rows
