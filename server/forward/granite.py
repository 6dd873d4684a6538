"""Forward of Granite (3.x) over the slot KV cache: a Llama decoder with four scalars from its config.

- the embedding is multiplied by `embedding_multiplier`;
- each residual branch (attention, MLP) is multiplied by `residual_multiplier` before it is added;
- attention scores are scaled by `attention_multiplier` (the HF attention's own `scaling`, as in Llama);
- the logits are divided by `logits_scaling`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kv_cache import KVCache
from .llama import LlamaFamilyForward, Rope
from .step import StepInput

MODEL_TYPES = ("granite",)


class GraniteForward(LlamaFamilyForward):
    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        embed_tokens, multiplier = self.embed, config.embedding_multiplier
        self.embed = lambda ids: embed_tokens(ids) * multiplier
        self.residual_multiplier: float = config.residual_multiplier
        self.logits_scaling: float = config.logits_scaling

    def block(self, i: int, layer: nn.Module, h: torch.Tensor, step: StepInput, cache: KVCache,
              rope: Rope) -> torch.Tensor:
        o = self.attention(i, layer.self_attn, layer.input_layernorm(h), step, cache, rope)
        h = h + o * self.residual_multiplier
        return h + layer.mlp(layer.post_attention_layernorm(h)) * self.residual_multiplier

    @torch.no_grad()
    def __call__(self, step: StepInput, cache: KVCache) -> torch.Tensor:
        return super().__call__(step, cache) / self.logits_scaling
