"""Tiny causal LMs of each supported architecture, built from configs with seeded random weights."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
ARCHITECTURES = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=8),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2),
}
# the linear layers PEFT targets by default, per architecture
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
for _name in ("mistral", "qwen2", "qwen3"):
    TARGETS[_name] = TARGETS["llama"]


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A 2-layer model of `arch` in eval mode, identical for the same seed."""
    torch.manual_seed(seed)
    config = ARCHITECTURES[arch]()
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def prompts(lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    """Random token ids of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen) for n in lengths]


def right_padded(seqs: list[torch.Tensor], pad: int = 0) -> torch.Tensor:
    """[batch, max_len]; with causal attention, right padding never changes the real tokens' logits."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out
