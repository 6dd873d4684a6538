"""R-LoRA config: everything a server needs, stored explicitly (adapter-methods.md §3.5, §3.9)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..base import get_field
from ..errors import AdapterFormatError, UnsupportedAdapterError

ADAPTER_TYPE = "r_lora"
_KNOWN_KEYS = {
    "adapter_type", "tasks", "r", "num_heads", "lora_alpha", "scaling", "dropout", "init_gamma",
    "target_modules", "offset",
}


@dataclass(frozen=True)
class RLoraConfig:
    tasks: list[str]
    r: int
    num_heads: int  # N, the number of B heads
    scaling: float  # s, used as is when serving (training used α/√r; the released eval used α/r, §3.5)
    target_modules: list[str] | str
    offset: bool  # True: offset_A / offset_B hold the static correction of the init offset
    lora_alpha: float | None = None  # informational: s is authoritative
    dropout: float = 0.0  # multi-head dropout p, for the trainer
    init_gamma: float = 64.0  # γ of the init, for the trainer

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], adapter: str) -> "RLoraConfig":
        unknown = sorted(set(config) - _KNOWN_KEYS)
        if unknown:
            raise UnsupportedAdapterError(f"{adapter}: unknown r_lora config keys {unknown}")
        if config.get("adapter_type") != ADAPTER_TYPE:
            raise AdapterFormatError(f"{adapter}: adapter_type must be {ADAPTER_TYPE!r}")
        tasks = get_field(config, "tasks", list, adapter=adapter)
        if not all(isinstance(t, str) for t in tasks):
            raise AdapterFormatError(f"{adapter}: config key 'tasks' must be a list of strings")
        target = get_field(config, "target_modules", (list, str), adapter=adapter)
        if isinstance(target, list) and not all(isinstance(t, str) for t in target):
            raise AdapterFormatError(f"{adapter}: config key 'target_modules' must be a list of strings or a regex")
        out = cls(
            tasks=list(tasks),
            r=get_field(config, "r", int, adapter=adapter),
            num_heads=get_field(config, "num_heads", int, adapter=adapter),
            scaling=get_field(config, "scaling", float, adapter=adapter),
            target_modules=list(target) if isinstance(target, list) else target,
            offset=get_field(config, "offset", bool, adapter=adapter),
            lora_alpha=get_field(config, "lora_alpha", float, None, adapter),
            dropout=get_field(config, "dropout", float, 0.0, adapter),
            init_gamma=get_field(config, "init_gamma", float, 64.0, adapter),
        )
        out.check(adapter)
        return out

    def check(self, adapter: str) -> None:
        for key in ("r", "num_heads"):
            if getattr(self, key) <= 0:
                raise AdapterFormatError(f"{adapter}: config key {key!r} must be positive, got {getattr(self, key)}")
        if not math.isfinite(self.scaling):
            raise AdapterFormatError(f"{adapter}: config key 'scaling' must be finite, got {self.scaling}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterFormatError(f"{adapter}: config key 'dropout' must be in [0, 1), got {self.dropout}")
        if not self.init_gamma > 0.0:
            raise AdapterFormatError(f"{adapter}: config key 'init_gamma' must be positive, got {self.init_gamma}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter_type": ADAPTER_TYPE, "tasks": list(self.tasks), "r": self.r,
            "num_heads": self.num_heads, "lora_alpha": self.lora_alpha, "scaling": self.scaling,
            "dropout": self.dropout, "init_gamma": self.init_gamma, "target_modules": self.target_modules,
            "offset": self.offset,
        }
