"""Forward of OLMo-2 over the slot KV cache: a Llama-family decoder with post-norms instead of pre-norms
(h += norm(attn(h)); h += norm(mlp(h))) and RMSNorm over the whole q and k projections (not per head)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.olmo2.modeling_olmo2 import apply_rotary_pos_emb

from ..kv_cache import KVCache
from .llama import LlamaFamilyForward, Rope
from .step import StepInput

MODEL_TYPES = ("olmo2",)


class Olmo2Forward(LlamaFamilyForward):
    rotate = staticmethod(apply_rotary_pos_emb)

    def block(self, i: int, layer: nn.Module, h: torch.Tensor, step: StepInput, cache: KVCache,
              rope: Rope) -> torch.Tensor:
        h = h + layer.post_attention_layernorm(self.attention(i, layer.self_attn, h, step, cache, rope))
        return h + layer.post_feedforward_layernorm(layer.mlp(h))

    def qkv(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, d = x.shape[0], self.head_dim
        q = attn.q_norm(attn.q_proj(x)).view(n, -1, d)
        k = attn.k_norm(attn.k_proj(x)).view(n, -1, d)
        return q, k, attn.v_proj(x).view(n, -1, d)
