"""Build random-weight adapters of every registered family for a tiny model."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny import TARGETS

from loraplex.adapters import AdaptedModel, Adapter, adapter_class, load_adapter

TASKS = ["alpha", "beta", "gamma"]
# module types each family adapts in the tests (GIFT shares Θ per module type, split per role where
# widths differ, as GPT-2's attn.c_proj and mlp.c_proj do)
FAMILY_TARGETS = {"llama": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}
FAMILY_TARGETS["phi3"] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # fused q/k/v and gate/up
FAMILY_TARGETS["gpt_neox"] = TARGETS["gpt_neox"]  # fused per-head q/k/v
FAMILY_TARGETS["starcoder2"] = ["q_proj", "v_proj", "o_proj", "c_fc", "c_proj"]
FAMILY_TARGETS["phi"] = ["q_proj", "v_proj", "dense", "fc1", "fc2"]
for _arch in ("mistral", "qwen2", "qwen3", "gemma", "olmo2", "gemma2", "gemma3_text", "granite", "stablelm"):
    FAMILY_TARGETS[_arch] = FAMILY_TARGETS["llama"]


def randomize(adapter: Adapter, seed: int, std: float = 0.15) -> None:
    """Overwrite every tensor with seeded noise so that each family's delta is far from zero."""
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(adapter.tensors):
        t = adapter.tensors[name]
        t.copy_(torch.randn(t.shape, generator=gen) * std)


def make_adapter(adapter_type: str, adapted: AdaptedModel, arch: str, name: str, tmp: Path, seed: int = 0,
                 tasks: list[str] | None = None, **options) -> Adapter:
    """Create (paper init), randomize, save and reload: the loaded copy is what the tests serve.
    A multi-task family serves `tasks` (default TASKS); task ids are unique on a server."""
    cls = adapter_class(adapter_type)
    adapter = cls.create(name, adapted.specs, target_modules=FAMILY_TARGETS[arch], rank=4,
                         tasks=(tasks or TASKS) if cls.multi_task else None, seed=seed, **options)
    randomize(adapter, seed + 100)
    adapter.save(tmp / name)
    return load_adapter(tmp / name)
