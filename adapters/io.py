"""Reading and writing adapter directories: `adapter_config.json` + `adapter_model.safetensors`.

Weights are only ever read with safetensors. Pickle-based files (`.bin`, `.pt`, ...) can run arbitrary
code when loaded, so they are refused, never opened.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from .errors import AdapterFormatError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Parse `adapter_config.json` of the adapter directory `path`."""
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterFormatError(f"adapter directory {str(directory)!r} does not exist")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterFormatError(f"{CONFIG_FILE} is missing in {str(directory)!r}")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterFormatError(f"{CONFIG_FILE} in {str(directory)!r} is larger than 16 MiB")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{CONFIG_FILE} in {str(directory)!r} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{CONFIG_FILE} in {str(directory)!r} must hold a JSON object")
    return config


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load the safetensors weights of the adapter directory `path` onto the CPU.

    The file is read into memory, never memory-mapped: mapped tensors would stay backed by the file, so that
    an admin rewriting it in place (`cp` onto it) would change the weights a server is serving, and
    truncating it would kill the server with SIGBUS at its next forward pass. The bytes read are also the
    bytes validated and served. The price is a transient second copy while the tensors are built."""
    directory = Path(path)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLED_SUFFIXES)
        if pickled:
            raise AdapterFormatError(
                f"{str(directory)!r} holds pickled weights ({', '.join(pickled)}), which are never loaded "
                f"because unpickling can run code; convert them to {WEIGHTS_FILE}"
            )
        raise AdapterFormatError(f"{WEIGHTS_FILE} is missing in {str(directory)!r}")
    try:
        tensors = load(weights.read_bytes())
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{WEIGHTS_FILE} in {str(directory)!r} is corrupt: {exc}") from None
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterFormatError(f"tensor {name!r} has dtype {tensor.dtype}; adapter weights must be floating point")
        if tensor.numel() and not all(torch.isfinite(v) for v in torch.aminmax(tensor)):  # NaN/inf reach min or max
            raise AdapterFormatError(f"tensor {name!r} holds NaN or infinite values")
    return tensors


def write_adapter_dir(path: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write an adapter directory atomically: a reader never sees half-written files."""
    directory = Path(path)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        contiguous = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        save_file(contiguous, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        if directory.exists():
            backup = directory.with_name(f".{directory.name}.old")
            os.replace(directory, backup)
            os.replace(staging, directory)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
