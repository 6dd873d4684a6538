"""Forward of GPT-2 over the slot KV cache: learned positions, fused c_attn (Conv1D), LayerNorm, GELU MLP."""

from __future__ import annotations

import torch
from torch import nn

from ..kv_cache import KVCache
from .base import CausalLMForward, UnsupportedModelError
from .step import StepInput, attend

MODEL_TYPES = ("gpt2",)


class GPT2Forward(CausalLMForward):
    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        if getattr(config, "add_cross_attention", False):
            raise UnsupportedModelError("GPT-2 with cross-attention is not a causal LM that loraplex serves")
        inner = model.transformer
        self.wte, self.wpe, self.blocks, self.ln_f = inner.wte, inner.wpe, list(inner.h), inner.ln_f
        self.num_layers = len(self.blocks)
        self.kv_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.max_positions = config.n_positions
        self.scales = [_scaling(block.attn, config, i) for i, block in enumerate(self.blocks)]

    def hidden(self, step: StepInput, cache: KVCache) -> torch.Tensor:
        n, d = step.num_rows, self.head_dim
        h = self.wte(step.input_ids) + self.wpe(step.positions)  # [N, D]
        width = h.shape[-1]
        for i, block in enumerate(self.blocks):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(h)).split(width, dim=-1)  # 3 x [N, D]
            o = attend(step, cache, i, q.view(n, -1, d), k.view(n, -1, d), v.view(n, -1, d), self.scales[i])
            h = h + attn.c_proj(o.reshape(n, width))
            h = h + block.mlp(block.ln_2(h))
        return self.ln_f(h[step.logits_rows])  # [B, D]


def _scaling(attn: nn.Module, config, layer: int) -> float:
    if hasattr(attn, "scaling"):
        return attn.scaling
    scale = (config.n_embd // config.n_head) ** -0.5 if config.scale_attn_weights else 1.0
    return scale / (layer + 1) if config.scale_attn_by_inverse_layer_idx else scale
