"""MTL-LoRA config: every value the forward pass needs, stored explicitly (adapter-methods.md §2, §7 note 6)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..base import get_field
from ..errors import AdapterFormatError, UnsupportedAdapterError

ADAPTER_TYPE = "mtl_lora"
LAMBDA_FORMATS = ("full", "diagonal")
_KEYS = {"adapter_type", "tasks", "r", "lora_alpha", "scaling", "num_b", "temperature", "lambda_format",
         "target_modules", "dropout"}
# options of the released code that change the forward pass and are not implemented: refused, never ignored
_UNSUPPORTED = {"tunable_scaler": "the tunable sigmoid scaler (tunable_scaler)"}


@dataclass(frozen=True)
class MtlLoraConfig:
    tasks: list[str]  # the task index is the position in this list
    r: int
    scaling: float  # s, applied as is (never re-derived from lora_alpha / r)
    num_b: int  # n, the number of shared up-projections B_i
    temperature: float  # τ of softmax(ω_t / τ)
    target_modules: list[str] | str
    lambda_format: str = "full"  # "full": Λ_t is r×r; "diagonal": Λ_t = diag(λ_t)
    lora_alpha: float | None = None  # provenance only: scaling was α/r when the adapter was created
    dropout: float = 0.05  # training dropout p on x before A; serving never applies it

    @property
    def diagonal(self) -> bool:
        return self.lambda_format == "diagonal"

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], adapter: str) -> "MtlLoraConfig":
        """Parse and check a config; every fault names its key."""
        for key, what in _UNSUPPORTED.items():
            if config.get(key):
                raise UnsupportedAdapterError(f"{adapter}: {what} is not supported")
        unknown = sorted(set(config) - _KEYS - set(_UNSUPPORTED))
        if unknown:
            names = ", ".join(map(repr, unknown))
            raise AdapterFormatError(f"{adapter}: unexpected config key(s) {names} for mtl_lora")
        tasks = get_field(config, "tasks", list, adapter=adapter)
        if not all(isinstance(t, str) for t in tasks):
            raise AdapterFormatError(f"{adapter}: config key 'tasks' must be a list of task names")
        target = get_field(config, "target_modules", (list, str), adapter=adapter)
        if isinstance(target, list) and not all(isinstance(t, str) for t in target):
            raise AdapterFormatError(f"{adapter}: config key 'target_modules' must be a list of names or a regex")
        lambda_format = get_field(config, "lambda_format", str, "full", adapter)
        if lambda_format not in LAMBDA_FORMATS:
            raise UnsupportedAdapterError(
                f"{adapter}: lambda_format {lambda_format!r} is not supported; use 'full' or 'diagonal'"
            )
        parsed = cls(
            tasks=list(tasks),
            r=get_field(config, "r", int, adapter=adapter),
            scaling=get_field(config, "scaling", float, adapter=adapter),
            num_b=get_field(config, "num_b", int, adapter=adapter),
            temperature=get_field(config, "temperature", float, adapter=adapter),
            target_modules=list(target) if isinstance(target, list) else target,
            lambda_format=lambda_format,
            lora_alpha=get_field(config, "lora_alpha", float, None, adapter),
            dropout=get_field(config, "dropout", float, 0.05, adapter),
        )
        parsed._check(adapter)
        return parsed

    def _check(self, adapter: str) -> None:
        if self.r <= 0:
            raise AdapterFormatError(f"{adapter}: config key 'r' must be positive, got {self.r}")
        if self.num_b <= 0:
            raise AdapterFormatError(f"{adapter}: config key 'num_b' must be positive, got {self.num_b}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise AdapterFormatError(f"{adapter}: config key 'temperature' must be positive, got {self.temperature}")
        if not math.isfinite(self.scaling):
            raise AdapterFormatError(f"{adapter}: config key 'scaling' must be finite, got {self.scaling}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterFormatError(f"{adapter}: config key 'dropout' must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        target = self.target_modules
        out: dict[str, Any] = {
            "adapter_type": ADAPTER_TYPE, "tasks": list(self.tasks), "r": self.r, "scaling": self.scaling,
            "num_b": self.num_b, "temperature": self.temperature, "lambda_format": self.lambda_format,
            "target_modules": target if isinstance(target, str) else list(target),
            "dropout": self.dropout,
        }
        if self.lora_alpha is not None:
            out["lora_alpha"] = self.lora_alpha
        return out
