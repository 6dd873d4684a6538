"""Forward of GPT-NeoX (Pythia, GPT-NeoX-20B) over the slot KV cache.

Pre-LayerNorm decoder with partial RoPE (HF's GPT-NeoX `apply_rotary_pos_emb` rotates the first
`partial_rotary_factor` of each head's dims) and one fused `query_key_value` projection whose output is laid out
per head: [q_h | k_h | v_h] for head h = 0..H-1 (HF: view(..., H, 3d) then chunk(3) on the last dim), not
[q | k | v]. The residual is parallel by default (h + attn(ln1 h) + mlp(ln2 h)), sequential otherwise.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

from ..kv_cache import KVCache
from .base import CausalLMForward
from .step import StepInput, attend

MODEL_TYPES = ("gpt_neox",)


class GPTNeoXForward(CausalLMForward):
    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        inner = model.gpt_neox
        self.embed, self.layers, self.norm, self.rotary = (inner.embed_in, list(inner.layers),
                                                           inner.final_layer_norm, inner.rotary_emb)
        self.num_layers = len(self.layers)
        self.kv_heads = config.num_attention_heads
        self.head_dim = self.layers[0].attention.head_size
        self.max_positions = None

    def hidden(self, step: StepInput, cache: KVCache) -> torch.Tensor:
        n, d = step.num_rows, self.head_dim
        h = self.embed(step.input_ids)  # [N, D]
        cos, sin = self.rotary(h, step.positions[None])  # [1, N, rotary dim]
        for i, layer in enumerate(self.layers):
            attn = layer.attention
            qkv = attn.query_key_value(layer.input_layernorm(h)).view(n, -1, 3 * d)  # [N, H, 3d]
            q, k, v = qkv.chunk(3, dim=-1)
            q, k = apply_rotary_pos_emb(q, k, cos[0], sin[0], unsqueeze_dim=1)
            o = attn.dense(attend(step, cache, i, q, k, v, attn.scaling).reshape(n, -1))
            if layer.use_parallel_residual:
                h = layer.mlp(layer.post_attention_layernorm(h)) + o + h
            else:
                h = o + h
                h = layer.mlp(layer.post_attention_layernorm(h)) + h
        return self.norm(h[step.logits_rows])  # [B, D]
