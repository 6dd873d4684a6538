"""Forward of Gemma-2 and Gemma-3 (text) over the slot KV cache.

A Llama-family decoder (Gemma's scaled embedding, (1 + w) RMSNorm and GeGLU MLP live in the HF modules) with:
- norms before and after both attention and MLP: h += post_attn(attn(in(h))); h += post_ff(mlp(pre_ff(h)));
- alternating sliding-window and full layers (`layer_types`, each attention's `sliding_window`);
- attention scaled by query_pre_attn_scalar ** -0.5 (the attention's own `scaling`);
- final logit soft-capping, cap * tanh(logits / cap);
- Gemma-2: attention logit soft-capping (`attend` then runs eager attention, as HF's Gemma-2 does);
- Gemma-3: per-head q_norm/k_norm, and a rotary embedding per layer type (local and global RoPE bases).
  HF's Gemma-3 attention ignores `attn_logit_softcapping`; so does this forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kv_cache import KVCache
from .llama import LlamaFamilyForward, Rope
from .step import StepInput

MODEL_TYPES = ("gemma2", "gemma3_text")


class Gemma2Forward(LlamaFamilyForward):
    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        self.layer_types: list[str] | None = None
        if config.model_type == "gemma2":
            self.softcaps = [layer.self_attn.attn_logit_softcapping for layer in self.layers]
        else:
            self.layer_types = list(config.layer_types)
        self.final_softcap: float | None = config.final_logit_softcapping

    def ropes(self, h: torch.Tensor, positions: torch.Tensor) -> list[Rope]:
        if self.layer_types is None:
            return super().ropes(h, positions)
        by_type = {}
        for layer_type in set(self.layer_types):
            cos, sin = self.rotary(h, positions[None], layer_type)  # [1, N, d]
            by_type[layer_type] = (cos[0], sin[0])
        return [by_type[t] for t in self.layer_types]

    def block(self, i: int, layer: nn.Module, h: torch.Tensor, step: StepInput, cache: KVCache,
              rope: Rope) -> torch.Tensor:
        o = self.attention(i, layer.self_attn, layer.input_layernorm(h), step, cache, rope)
        h = h + layer.post_attention_layernorm(o)
        return h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))

    @torch.no_grad()
    def __call__(self, step: StepInput, cache: KVCache) -> torch.Tensor:
        logits = super().__call__(step, cache)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
