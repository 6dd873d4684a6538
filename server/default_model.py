"""The model `loraplex serve` runs when no `--base-model` is given: the embedded default checkpoint
(`loraplex/default_model/`, shipped in the package and trained by scripts/train_default_model.py).
It needs no network."""

from __future__ import annotations

import torch
from torch import nn

from ..default_model import default_model_path
from .loader import load_base


def load_default(device: str = "auto", dtype: str | torch.dtype = "auto") -> tuple[nn.Module, object, str]:
    """(model, tokenizer, description) of the embedded default model."""
    path = default_model_path()
    model, tokenizer = load_base(str(path), device=device, dtype=dtype)
    return model, tokenizer, f"the embedded default model ({path})"
