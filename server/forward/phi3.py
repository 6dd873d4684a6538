"""Forward of Phi-3 (and Phi-3.5, Phi-4, Phi-4-mini, which share `model_type` "phi3") over the slot KV cache.

A Llama-family decoder whose q/k/v come from one fused `qkv_proj` (split here) and whose MLP is one fused
`gate_up_proj` (inside HF's Phi3MLP). RoPE may be partial (`partial_rotary_factor`): HF's Phi-3
`apply_rotary_pos_emb` rotates the first dims only. LongRoPE switches from its short to its long factors,
for every position at once, as soon as a forward sees a position past `original_max_position_embeddings`;
HF's own generation then mixes keys rotated under both. A packed step would switch every sequence in it, so
LongRoPE is served up to `original_max_position_embeddings` only (`max_positions`: the engine refuses a
longer `max_seq_len`), where it is exact.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

from .llama import LlamaFamilyForward

MODEL_TYPES = ("phi3",)


class Phi3Forward(LlamaFamilyForward):
    rotate = staticmethod(apply_rotary_pos_emb)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        rope = model.config.rope_parameters or {}
        if rope.get("rope_type", "default") == "longrope":
            self.max_positions = rope.get("original_max_position_embeddings",
                                          model.config.original_max_position_embeddings)

    def qkv(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, d = x.shape[0], self.head_dim
        q_width = attn.config.num_attention_heads * d
        kv_width = attn.num_key_value_heads * d
        q, k, v = attn.qkv_proj(x).split([q_width, kv_width, kv_width], dim=-1)
        return q.view(n, -1, d), k.view(n, -1, d), v.view(n, -1, d)
