"""Tiny causal LMs of each supported architecture, built from configs with seeded random weights."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PhiConfig,
    Qwen2Config,
    Qwen3Config,
    StableLmConfig,
    Starcoder2Config,
)

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # within the tiny vocabulary
ARCHITECTURES = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=8),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2),
    "gemma": lambda: GemmaConfig(**_COMMON, head_dim=8),
    # partial RoPE under LongRoPE (as Phi-3.5/Phi-4-mini), and a sliding window shorter than the test prompts
    "phi3": lambda: Phi3Config(**_COMMON, **_IDS, sliding_window=6, original_max_position_embeddings=64,
                               rope_scaling={"rope_type": "longrope", "partial_rotary_factor": 0.5,
                                             "short_factor": [1.0, 1.5], "long_factor": [2.0, 4.0]}),
    "olmo2": lambda: Olmo2Config(**_COMMON, **_IDS),
    # caps low enough to bend the tiny model's small scores; a sliding then a full layer; scaling != head_dim**-0.5
    "gemma2": lambda: Gemma2Config(**_COMMON, head_dim=8, sliding_window=4, query_pre_attn_scalar=2,
                                   attn_logit_softcapping=0.1, final_logit_softcapping=0.5),
    "gemma3_text": lambda: Gemma3TextConfig(
        **_COMMON, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=2, final_logit_softcapping=0.5,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # every scalar away from 1 (attention_multiplier != head_dim ** -0.5)
    "granite": lambda: GraniteConfig(**_COMMON, **_IDS, embedding_multiplier=3.0, residual_multiplier=0.5,
                                     attention_multiplier=0.2, logits_scaling=2.0),
    # StableLM-2-12B's options: parallel residual, per-head q/k LayerNorms, q/k/v biases; partial RoPE
    "stablelm": lambda: StableLmConfig(**_COMMON, **_IDS, use_parallel_residual=True, qk_layernorm=True,
                                       use_qkv_bias=True, partial_rotary_factor=0.5),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=128, **_IDS,
                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                       "partial_rotary_factor": 0.5}),
    # a sliding window shorter than the test prompts
    "starcoder2": lambda: Starcoder2Config(**_COMMON, **_IDS, sliding_window=6),
    "phi": lambda: PhiConfig(**_COMMON, **_IDS, partial_rotary_factor=0.5, qk_layernorm=True),
}
# the linear layers PEFT targets by default, per architecture
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
TARGETS["phi3"] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
TARGETS["gpt_neox"] = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
TARGETS["starcoder2"] = ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"]
TARGETS["phi"] = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
for _name in ("mistral", "qwen2", "qwen3", "gemma", "olmo2", "gemma2", "gemma3_text", "granite", "stablelm"):
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
