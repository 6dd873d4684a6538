"""The adapter-type registry: one `adapter_type` string -> one `Adapter` subclass."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, TypeVar

from .errors import UnsupportedAdapterError

if TYPE_CHECKING:
    from .base import Adapter

_REGISTRY: dict[str, type["Adapter"]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
A = TypeVar("A", bound="type[Adapter]")


def register_adapter_type(cls: A) -> A:
    """Class decorator: register `cls` under `cls.adapter_type`. Fails loudly on a bad or duplicate name."""
    name = getattr(cls, "adapter_type", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"adapter_type must be a lowercase identifier, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"adapter_type {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls
    return cls


def adapter_class(adapter_type: str) -> type["Adapter"]:
    """The class registered for `adapter_type`, or UnsupportedAdapterError naming the known types."""
    try:
        return _REGISTRY[adapter_type]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnsupportedAdapterError(f"unknown adapter_type {adapter_type!r}; supported: {known}") from None


def adapter_types() -> list[str]:
    """The registered adapter types, sorted."""
    return sorted(_REGISTRY)
