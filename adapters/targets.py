"""Matching adapter target specifications against the module names of a model."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

PEFT_PREFIX = "base_model.model."


def matches_target(module_name: str, target: str | list[str] | None) -> bool:
    """PEFT semantics: a string is a regex that must match the whole name; a list holds names that equal
    the module name or its dotted suffix (`q_proj` matches `model.layers.0.self_attn.q_proj`)."""
    if target is None:
        return False
    if isinstance(target, str):
        return re.fullmatch(target, module_name) is not None or module_name == target
    return any(module_name == t or module_name.endswith("." + t) for t in target)


def pattern_value(patterns: Mapping[str, float | int], module_name: str, default: float | int) -> float | int:
    """PEFT `rank_pattern` / `alpha_pattern` lookup: the first key whose regex matches the end of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def module_type(module_name: str) -> str:
    """The last component of a dotted module name: `model.layers.3.self_attn.q_proj` -> `q_proj`."""
    return module_name.rsplit(".", 1)[-1]


def split_param_name(name: str, params: Iterable[str]) -> tuple[str, str] | None:
    """Split `<module>.<param>` for a known param suffix (which may itself contain dots)."""
    for param in sorted(params, key=len, reverse=True):
        if name.endswith("." + param):
            return name[: -len(param) - 1], param
    return None
