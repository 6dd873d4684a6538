"""loraplex.adapters: adapter families on any Hugging Face causal LM, batched per token.

    from loraplex.adapters import AdaptedModel, load_adapter
    adapted = AdaptedModel(model)                       # wraps the model's linear layers in place
    bound = adapted.bind(load_adapter("adapters/sentiment"))
    with adapted.batch([(bound, 0), (None, 0)], rows_per_sequence=seq_len):
        logits = model(input_ids).logits                # row 0 through the adapter, row 1 the base model
"""

# each family registers its adapter_type on import
from . import gift, hybrid, lora, loratrf, mtl_lora, r_lora  # noqa: F401
from .base import Adapter, BoundAdapter
from .context import BatchContext
from .errors import (
    AdapterError,
    AdapterFormatError,
    IncompatibleAdapterError,
    UnknownTaskError,
    UnsupportedAdapterError,
)
from .loading import load_adapter, resolve_adapter_type
from .model import AdaptedModel
from .registry import adapter_class, adapter_types, register_adapter_type

__all__ = [
    "AdaptedModel", "Adapter", "AdapterError", "AdapterFormatError", "BatchContext", "BoundAdapter",
    "IncompatibleAdapterError", "UnknownTaskError", "UnsupportedAdapterError", "adapter_class", "adapter_types",
    "load_adapter", "register_adapter_type", "resolve_adapter_type",
]
