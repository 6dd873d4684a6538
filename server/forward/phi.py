"""Forward of Phi-1, Phi-1.5 and Phi-2 (`model_type` "phi") over the slot KV cache.

A Llama-family decoder whose attention and MLP run in parallel from one LayerNorm
(h += dense(attn(ln h)) + fc2(gelu(fc1(ln h)))), with partial RoPE, q/k/v biases, an output projection named
`dense`, optional per-head LayerNorms of q and k (`qk_layernorm`, one shared by all heads), a final LayerNorm
named `final_layernorm` and a biased output head.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.phi.modeling_phi import apply_rotary_pos_emb

from ..kv_cache import KVCache
from .llama import LlamaFamilyForward, Rope
from .stablelm import partial_rotary
from .step import StepInput

MODEL_TYPES = ("phi",)


class PhiForward(LlamaFamilyForward):
    rotate = staticmethod(partial_rotary(apply_rotary_pos_emb))
    final_norm = "final_layernorm"
    output_proj = "dense"

    def block(self, i: int, layer: nn.Module, h: torch.Tensor, step: StepInput, cache: KVCache,
              rope: Rope) -> torch.Tensor:
        x = layer.input_layernorm(h)
        return self.attention(i, layer.self_attn, x, step, cache, rope) + layer.mlp(x) + h

    def qkv(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().qkv(attn, x)
        if attn.qk_layernorm:
            q, k = attn.q_layernorm(q), attn.k_layernorm(k)
        return q, k, v
