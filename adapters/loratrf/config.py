"""LoRATRF config: rank, explicit scaling, targets, the filter's init and the interpretation flag.

Only the abstract of arXiv 2412.09827 is known, so the forward is the interim task-aware filter of
adapter-methods.md §5.2. The file names that design in `interpretation`; a file naming any other design is
refused rather than served with the wrong math (the spec's "keep the interim design behind a flag").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..base import get_field
from ..errors import AdapterFormatError, UnsupportedAdapterError

ADAPTER_TYPE = "loratrf"
INTERPRETATION = "adapter-methods.md 5.2 interim filter: y = s * (sigmoid(u F^T + c) * u) B^T, u = drop(x) A^T"
DEFAULT_DROPOUT = 0.05
DEFAULT_FILTER_BIAS_INIT = 4.0
_KEYS = {"adapter_type", "r", "lora_alpha", "scaling", "target_modules", "dropout", "filter_bias_init", "interpretation"}


@dataclass(frozen=True)
class LoraTRFConfig:
    r: int
    lora_alpha: float  # informative: `scaling` is what the forward uses (α / r when created)
    scaling: float
    target_modules: list[str] | str
    dropout: float = DEFAULT_DROPOUT  # training dropout on x; a trainer sets BoundAdapter.dropout from it
    filter_bias_init: float = DEFAULT_FILTER_BIAS_INIT  # c at init, so f = σ(c) ≈ 0.98
    interpretation: str = INTERPRETATION

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], adapter: str) -> "LoraTRFConfig":
        unknown = sorted(set(config) - _KEYS)
        if unknown:  # a key we do not know may change the forward: refuse rather than ignore
            raise UnsupportedAdapterError(f"{adapter}: unknown loratrf config key(s) {', '.join(map(repr, unknown))}")
        if config.get("adapter_type") != ADAPTER_TYPE:
            raise AdapterFormatError(f"{adapter}: config key 'adapter_type' must be {ADAPTER_TYPE!r}")
        interpretation = get_field(config, "interpretation", str, adapter=adapter)
        if interpretation != INTERPRETATION:
            raise UnsupportedAdapterError(
                f"{adapter}: loratrf interpretation {interpretation[:120]!r} is not supported; "
                f"this server implements {INTERPRETATION!r}"
            )
        r = get_field(config, "r", int, adapter=adapter)
        if r <= 0:
            raise AdapterFormatError(f"{adapter}: config key 'r' must be positive, got {r}")
        target = config.get("target_modules")
        if isinstance(target, list):
            if not target or not all(isinstance(t, str) and t for t in target):
                raise AdapterFormatError(f"{adapter}: config key 'target_modules' must be non-empty names")
        elif not isinstance(target, str) or not target:
            raise AdapterFormatError(f"{adapter}: config key 'target_modules' must be a list of names or a regex string")
        out = cls(
            r=r,
            lora_alpha=get_field(config, "lora_alpha", float, adapter=adapter),
            scaling=get_field(config, "scaling", float, adapter=adapter),
            target_modules=list(target) if isinstance(target, list) else target,
            dropout=get_field(config, "dropout", float, DEFAULT_DROPOUT, adapter),
            filter_bias_init=get_field(config, "filter_bias_init", float, DEFAULT_FILTER_BIAS_INIT, adapter),
            interpretation=interpretation,
        )
        for key in ("lora_alpha", "scaling", "filter_bias_init"):
            if not math.isfinite(getattr(out, key)):
                raise AdapterFormatError(f"{adapter}: config key {key!r} must be finite")
        if not 0.0 <= out.dropout < 1.0:
            raise AdapterFormatError(f"{adapter}: config key 'dropout' must be in [0, 1), got {out.dropout}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter_type": ADAPTER_TYPE, "r": self.r, "lora_alpha": self.lora_alpha, "scaling": self.scaling,
            "target_modules": self.target_modules, "dropout": self.dropout,
            "filter_bias_init": self.filter_bias_init, "interpretation": self.interpretation,
        }
