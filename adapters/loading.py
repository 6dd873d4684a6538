"""Loading adapters from disk: dispatch on `adapter_type` (or PEFT's `peft_type`), never on file names."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .base import Adapter
from .errors import AdapterFormatError, UnsupportedAdapterError
from .io import read_config, read_tensors
from .registry import adapter_class


def resolve_adapter_type(config: dict[str, Any]) -> str:
    """Our own adapters write `adapter_type`; PEFT LoRA checkpoints carry `peft_type: LORA`."""
    adapter_type = config.get("adapter_type")
    if adapter_type is not None:
        if not isinstance(adapter_type, str):
            raise AdapterFormatError(f"adapter_type must be a string, got {adapter_type!r}")
        return adapter_type
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise AdapterFormatError("adapter_config.json has neither 'adapter_type' nor 'peft_type'")
    if str(peft_type).upper() != "LORA":
        raise UnsupportedAdapterError(f"PEFT type {peft_type!r} is not supported; loraplex serves PEFT LORA adapters")
    return "lora"


def load_adapter(path: str | os.PathLike, name: str | None = None) -> Adapter:
    """Read and validate the adapter directory `path`. Touches no model; raises AdapterError on any fault."""
    config = read_config(path)
    cls = adapter_class(resolve_adapter_type(config))
    tensors = read_tensors(path)
    return cls.from_files(name if name is not None else Path(path).name, config, tensors)
