"""Forward of StableLM (StableLM-2, StableLM-3B-4E1T, StableCode) over the slot KV cache.

A Llama-family decoder with LayerNorms, partial RoPE (`partial_rotary_factor`: only the first dims of each head
rotate), optional q/k/v biases (inside the linear layers), optional per-head LayerNorms of q and k
(`qk_layernorm`: one LayerNorm per head, HF's module applied to [N, H, d] as to its [B, H, T, d]), and an
optional parallel residual (`use_parallel_residual`: h += attn(ln h) + mlp(ln h), one norm).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.models.stablelm.modeling_stablelm import apply_rotary_pos_emb

from ..kv_cache import KVCache
from .llama import LlamaFamilyForward, Rope
from .step import StepInput

MODEL_TYPES = ("stablelm",)

Rotate = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def partial_rotary(apply: Rotate) -> Rotate:
    """A rotation of the first cos.shape[-1] dims of each head by HF's `apply` (which rotates whole tensors),
    the others passed through, as HF's StableLM and Phi attentions do."""

    def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        n = cos.shape[-1]
        q_rot, k_rot = apply(q[..., :n], k[..., :n], cos, sin, unsqueeze_dim=unsqueeze_dim)
        return torch.cat((q_rot, q[..., n:]), dim=-1), torch.cat((k_rot, k[..., n:]), dim=-1)

    return rotate


class StableLmForward(LlamaFamilyForward):
    rotate = staticmethod(partial_rotary(apply_rotary_pos_emb))

    def block(self, i: int, layer: nn.Module, h: torch.Tensor, step: StepInput, cache: KVCache,
              rope: Rope) -> torch.Tensor:
        x = layer.input_layernorm(h)
        o = self.attention(i, layer.self_attn, x, step, cache, rope)
        if layer.use_parallel_residual:
            return h + o + layer.mlp(x)
        h = h + o
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def qkv(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().qkv(attn, x)
        if attn.qk_layernorm:
            q, k = attn.q_layernorm(q), attn.k_layernorm(k)
        return q, k, v
