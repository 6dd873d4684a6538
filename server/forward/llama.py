"""Forward of the Llama family (Llama, Mistral, Qwen2, Qwen3, Gemma) over the slot KV cache, built from HF's
modules. Architectures that differ only in the block's norms or in how q/k/v are projected subclass it
(phi3.py, olmo2.py, gemma2.py, granite.py, stablelm.py, starcoder2.py, phi.py)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..kv_cache import KVCache
from .base import CausalLMForward, UnsupportedModelError
from .step import StepInput, attend

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin) [N, rotary dim]


class LlamaFamilyForward(CausalLMForward):
    """pre-norm decoder: h += o_proj(attn(rope(q_proj x), rope(k_proj x), v_proj x)); h += mlp(norm h).

    Qwen3 adds RMSNorm over each head of q and k before RoPE (`q_norm`, `k_norm`); Qwen2 has q/k/v biases
    (inside the linear layers); Mistral and Qwen2 may use sliding-window attention. Gemma's differences live
    in its HF modules: the embedding scales by sqrt(hidden), the norms multiply by (1 + w), the MLP is GeGLU.
    """

    rotate = staticmethod(apply_rotary_pos_emb)  # (q, k, cos, sin, unsqueeze_dim) -> (q, k)
    final_norm = "norm"  # the name of the inner model's final norm
    output_proj = "o_proj"  # the attention's output projection (Phi: dense)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
            raise UnsupportedModelError(f"{type(model).__name__}: expected model.layers and model.rotary_emb")
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModelError(f"{config.model_type} with use_bidirectional_attention is an encoder, "
                                        "not a causal LM that loraplex serves")
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = getattr(inner, self.final_norm)
        self.rotary = inner.rotary_emb
        attn = self.layers[0].self_attn
        self.num_layers = len(self.layers)
        self.head_dim = attn.head_dim
        self.kv_heads = config.num_key_value_heads
        self.max_positions = None
        if (getattr(config, "rope_parameters", None) or {}).get("rope_type") == "dynamic":
            # HF rescales dynamic-NTK RoPE by the longest position in a forward; in a packed step that would make
            # one sequence's rotation depend on the others. Up to the trained length it is the plain RoPE.
            self.max_positions = config.max_position_embeddings
        self.windows = [_window(layer.self_attn, config) for layer in self.layers]
        self.softcaps: list[float | None] = [None] * self.num_layers  # attention logit soft-capping per layer

    def hidden(self, step: StepInput, cache: KVCache) -> torch.Tensor:
        h = self.embed(step.input_ids)  # [N, D]
        ropes = self.ropes(h, step.positions)
        for i, layer in enumerate(self.layers):
            h = self.block(i, layer, h, step, cache, ropes[i])
        return self.norm(h[step.logits_rows])  # [B, D]

    def ropes(self, h: torch.Tensor, positions: torch.Tensor) -> list[Rope]:
        """(cos, sin) of every layer: one rotary embedding shared by all of them."""
        cos, sin = self.rotary(h, positions[None])  # [1, N, d]
        return [(cos[0], sin[0])] * self.num_layers

    def block(self, i: int, layer: nn.Module, h: torch.Tensor, step: StepInput, cache: KVCache,
              rope: Rope) -> torch.Tensor:
        """One decoder layer over the residual stream h [N, D]."""
        h = h + self.attention(i, layer.self_attn, layer.input_layernorm(h), step, cache, rope)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def attention(self, i: int, attn: nn.Module, x: torch.Tensor, step: StepInput, cache: KVCache,
                  rope: Rope) -> torch.Tensor:
        """o_proj of the attention of layer i over the normed input x [N, D]."""
        q, k, v = self.qkv(attn, x)
        q, k = self.rotate(q, k, *rope, unsqueeze_dim=1)
        o = attend(step, cache, i, q, k, v, attn.scaling, self.windows[i], self.softcaps[i])  # [N, H, d]
        return getattr(attn, self.output_proj)(o.reshape(x.shape[0], -1))

    def qkv(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [N, H, d], k and v [N, KV, d], before RoPE."""
        n, d = x.shape[0], self.head_dim
        q = attn.q_proj(x).view(n, -1, d)
        k = attn.k_proj(x).view(n, -1, d)
        v = attn.v_proj(x).view(n, -1, d)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q, k, v


def _window(attn: nn.Module, config) -> int | None:
    """The sliding window of one layer: Qwen2/Qwen3/Gemma-2/3 set it per layer, Mistral/Phi-3 for every layer."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    if getattr(config, "model_type", "") in ("mistral", "phi3"):
        return getattr(config, "sliding_window", None)
    return None
