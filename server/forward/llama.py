"""Forward of the Llama family (Llama, Mistral, Qwen2, Qwen3) over the slot KV cache, built from HF's modules."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..kv_cache import KVCache
from .base import CausalLMForward, UnsupportedModelError
from .step import StepInput, attend

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class LlamaFamilyForward(CausalLMForward):
    """pre-norm decoder: h += o_proj(attn(rope(q_proj x), rope(k_proj x), v_proj x)); h += mlp(norm h).

    Qwen3 adds RMSNorm over each head of q and k before RoPE (`q_norm`, `k_norm`); Qwen2 has q/k/v biases
    (inside the linear layers); Mistral and Qwen2 may use sliding-window attention.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
            raise UnsupportedModelError(f"{type(model).__name__}: expected model.layers and model.rotary_emb")
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        attn = self.layers[0].self_attn
        self.num_layers = len(self.layers)
        self.head_dim = attn.head_dim
        self.kv_heads = config.num_key_value_heads
        self.max_positions = None
        self.windows = [_window(layer.self_attn, config) for layer in self.layers]

    def hidden(self, step: StepInput, cache: KVCache) -> torch.Tensor:
        n, d = step.num_rows, self.head_dim
        h = self.embed(step.input_ids)  # [N, D]
        cos, sin = self.rotary(h, step.positions[None])  # [1, N, d]
        cos, sin = cos[0], sin[0]  # [N, d]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(n, -1, d)  # [N, H, d]
            k = attn.k_proj(x).view(n, -1, d)  # [N, KV, d]
            v = attn.v_proj(x).view(n, -1, d)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
            o = attend(step, cache, i, q, k, v, attn.scaling, self.windows[i])  # [N, H, d]
            h = h + attn.o_proj(o.reshape(n, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.norm(h[step.logits_rows])  # [B, D]


def _window(attn: nn.Module, config) -> int | None:
    """The sliding window of one layer: Qwen2/Qwen3 set it per layer, Mistral for every layer."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    if getattr(config, "model_type", "") == "mistral":
        return getattr(config, "sliding_window", None)
    return None
