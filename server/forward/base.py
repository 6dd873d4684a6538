"""The interface of a model forward over the slot-based KV cache."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..kv_cache import KVCache
from .step import StepInput


# The attention kernels a step may use: all but cuDNN's. cuDNN builds an execution plan for every new shape, and
# here shapes change every step (the KV length grows, prompts differ): on an H100 that cost 3.4 ms of host time
# per call, two thirds of a decode step's (docs/design.md §12). Flash and memory-efficient kernels need no plan.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class UnsupportedModelError(ValueError):
    """The base model's architecture has no forward here (the message names the supported ones)."""


class CausalLMForward(ABC):
    """Runs a Hugging Face causal LM's own modules (embeddings, norms, the possibly adapted linear layers,
    MLPs, rotary embedding) over a packed step, reading and writing the KV cache in place.

    Adapters act through the wrapped linear layers, so a caller selects them with `AdaptedModel.batch`
    around the call, exactly as around the HF forward.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.head = model.get_output_embeddings()

    # geometry of the KV cache this model needs
    num_layers: int
    kv_heads: int
    head_dim: int
    max_positions: int | None  # a hard position limit (learned positions, LongRoPE's short range), or None

    def new_cache(self, num_slots: int, max_seq_len: int) -> KVCache:
        param = next(self.model.parameters())
        return KVCache(self.num_layers, num_slots, self.kv_heads, max_seq_len, self.head_dim, param.device, param.dtype)

    @abstractmethod
    def hidden(self, step: StepInput, cache: KVCache) -> torch.Tensor:
        """Final hidden states of the rows in `step.logits_rows`, after the final norm: [B, D]."""

    @torch.no_grad()
    def __call__(self, step: StepInput, cache: KVCache) -> torch.Tensor:
        """Logits [B, V] of each sequence's last new token (in run order)."""
        with sdpa_kernel(SDPA_BACKENDS):
            return self.head(self.hidden(step, cache))
