"""Errors raised while reading, validating or applying adapters.

Every error names the adapter and the problem in a short message, so that the server can pass the
message to the client unchanged (gRPC caps error details, so messages stay well under 8 KiB).
"""

from __future__ import annotations


class AdapterError(ValueError):
    """Base class: the adapter cannot be used. Nothing was changed by the failed operation."""


class AdapterFormatError(AdapterError):
    """The files on disk are missing, corrupt, pickled, or do not form a valid adapter."""


class UnsupportedAdapterError(AdapterError):
    """The adapter uses a feature or adapter type that loraplex does not serve (named in the message)."""


class IncompatibleAdapterError(AdapterError):
    """The adapter does not fit the base model (a module is missing or a shape differs)."""


class UnknownTaskError(AdapterError, LookupError):
    """A request named a task that the adapter does not have."""


def shorten(text: str, limit: int = 600) -> str:
    """Keep messages short: gRPC error details are capped, and a wall of names helps nobody."""
    return text if len(text) <= limit else text[: limit - 15] + " ... (truncated)"
