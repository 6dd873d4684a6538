"""Hybrid (LoRA + attention fusion) config: target tasks, the K source LoRAs, and the fusion settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..base import check_name, get_field
from ..errors import AdapterFormatError, UnsupportedAdapterError

ADAPTER_TYPE = "hybrid"
_KEYS = {"adapter_type", "tasks", "sources", "target_modules", "attention_dim", "temperature", "fusion_dropout"}
_SOURCE_KEYS = {"name", "r", "scaling"}


@dataclass(frozen=True)
class SourceSpec:
    """One source-task LoRA: its label, rank r_k and explicit scaling s_k."""

    name: str
    r: int
    scaling: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "r": self.r, "scaling": self.scaling}


@dataclass(frozen=True)
class HybridConfig:
    tasks: list[str]  # target tasks t = 0..T-1; a request's task picks fusion.<t>
    sources: list[SourceSpec]  # k = 0..K-1, shared by all target tasks
    target_modules: list[str] | str
    attention_dim: int = 16  # d_a
    temperature: float = 1.0
    fusion_dropout: float = 0.0  # training only: the trainer sets BoundAdapter.dropout from it

    @property
    def num_sources(self) -> int:
        return len(self.sources)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], adapter: str) -> "HybridConfig":
        """Parse and check every field; unknown keys are refused (they could change the forward pass)."""
        unknown = sorted(set(config) - _KEYS)
        if unknown:
            raise UnsupportedAdapterError(f"{adapter}: hybrid config key(s) {', '.join(map(repr, unknown))} not supported")
        kind = get_field(config, "adapter_type", str, adapter=adapter)
        if kind != ADAPTER_TYPE:
            raise AdapterFormatError(f"{adapter}: config key 'adapter_type' must be {ADAPTER_TYPE!r}, got {kind!r}")
        tasks = get_field(config, "tasks", list, adapter=adapter)
        if not tasks or not all(isinstance(t, str) for t in tasks):
            raise AdapterFormatError(f"{adapter}: config key 'tasks' must be a non-empty list of task names")
        raw_sources = get_field(config, "sources", list, adapter=adapter)
        if not raw_sources:
            raise AdapterFormatError(f"{adapter}: config key 'sources' must list at least one source LoRA")
        sources = [_parse_source(s, k, adapter) for k, s in enumerate(raw_sources)]
        target = config.get("target_modules")
        if isinstance(target, list):
            if not target or not all(isinstance(t, str) for t in target):
                raise AdapterFormatError(f"{adapter}: config key 'target_modules' must be a non-empty list of names")
        elif not isinstance(target, str):
            raise AdapterFormatError(f"{adapter}: config key 'target_modules' must be a list of names or a regex string")
        attention_dim = get_field(config, "attention_dim", int, 16, adapter)
        if attention_dim <= 0:
            raise AdapterFormatError(f"{adapter}: config key 'attention_dim' must be positive, got {attention_dim}")
        temperature = get_field(config, "temperature", float, 1.0, adapter)
        if not temperature > 0 or temperature == float("inf"):
            raise AdapterFormatError(f"{adapter}: config key 'temperature' must be positive and finite, got {temperature}")
        dropout = get_field(config, "fusion_dropout", float, 0.0, adapter)
        if not 0.0 <= dropout < 1.0:
            raise AdapterFormatError(f"{adapter}: config key 'fusion_dropout' must be in [0, 1), got {dropout}")
        return cls(list(tasks), sources, list(target) if isinstance(target, list) else target, attention_dim,
                   temperature, dropout)

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter_type": ADAPTER_TYPE,
            "tasks": list(self.tasks),
            "sources": [s.to_dict() for s in self.sources],
            "target_modules": list(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules,
            "attention_dim": self.attention_dim,
            "temperature": self.temperature,
            "fusion_dropout": self.fusion_dropout,
        }


def _parse_source(raw: Any, k: int, adapter: str) -> SourceSpec:
    where = f"{adapter}: sources[{k}]"
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{where} must be an object with keys name, r, scaling")
    unknown = sorted(set(raw) - _SOURCE_KEYS)
    if unknown:
        raise UnsupportedAdapterError(f"{where}: key(s) {', '.join(map(repr, unknown))} not supported")
    name = check_name(get_field(raw, "name", str, adapter=where), "source name")
    r = get_field(raw, "r", int, adapter=where)
    if r <= 0:
        raise AdapterFormatError(f"{where}: 'r' must be positive, got {r}")
    scaling = get_field(raw, "scaling", float, adapter=where)
    if scaling != scaling or abs(scaling) == float("inf"):
        raise AdapterFormatError(f"{where}: 'scaling' must be finite, got {scaling}")
    return SourceSpec(name, r, scaling)
