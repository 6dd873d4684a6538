"""Loading the base model and its tokenizer through transformers, with errors that say what went wrong."""

from __future__ import annotations

import torch
from torch import nn

from .forward import SUPPORTED_MODEL_TYPES, UnsupportedModelError, check_model_type

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The base model or its tokenizer could not be loaded (the message says which and why)."""


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; "cuda" without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"device {device!r} is not a device name (use auto, cpu or cuda)") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device cuda was asked for, but torch sees no CUDA device")
    if resolved.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"device {device!r} is not supported (use auto, cpu or cuda)")
    return resolved


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """"auto" -> bfloat16 on CUDA, float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelLoadError(f"dtype {dtype} is not supported (use {', '.join(DTYPES)})")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported (use auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def load_base(path_or_hub_id: str, device: str = "auto", dtype: str | torch.dtype = "auto") -> tuple[nn.Module, object]:
    """(model in eval mode on `device`, tokenizer) for a local directory or a Hub id.

    The architecture is checked from the config before any weights are read: loraplex's forward serves
    the model types in `SUPPORTED_MODEL_TYPES` only.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    try:
        config = AutoConfig.from_pretrained(path_or_hub_id)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, HF errors: all mean "cannot read the config"
        raise ModelLoadError(f"cannot read a model config from {path_or_hub_id!r}: {exc}") from exc
    try:
        check_model_type(getattr(config, "model_type", None))
    except UnsupportedModelError as exc:
        raise ModelLoadError(f"{path_or_hub_id!r}: {exc}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(path_or_hub_id, config=config, dtype=torch_dtype)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the model weights from {path_or_hub_id!r}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_hub_id)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer from {path_or_hub_id!r}: {exc}") from exc
    model = model.to(target).eval()
    model.requires_grad_(False)
    _own_the_weights(model)
    return model, tokenizer


@torch.no_grad()
def _own_the_weights(model: nn.Module) -> None:
    """Copy CPU weights that still live in a memory map of the checkpoint into memory of their own.

    transformers leaves CPU weights memory-mapped from the safetensors files: a file rewritten in place would
    change what a running server computes, and one truncated would kill it with SIGBUS at its next forward.
    The copy costs one pass over the weights at start. Tied weights stay tied (each Parameter once).
    """
    for param in model.parameters():  # unique Parameter objects: a tied head and embedding are one
        if param.device.type == "cpu":
            param.data = param.data.clone()


__all__ = ["DTYPES", "ModelLoadError", "SUPPORTED_MODEL_TYPES", "load_base", "resolve_device", "resolve_dtype"]
