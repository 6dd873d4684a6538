"""LoRA (Hu et al., arXiv 2106.09685) in PEFT's on-disk format: y = x Wᵀ + b + s · (x Aᵀ) Bᵀ."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ..base import Adapter, BoundAdapter, kaiming_uniform, require_modules, select_layers
from ..errors import AdapterFormatError, UnsupportedAdapterError
from ..linear import LinearSpec
from ..ops import lowrank_delta, lowrank_weight
from ..registry import register_adapter_type
from .config import LoraConfig

# base_model.model.<module>.lora_A[.<adapter name>].weight
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED_KEYS = {
    "lora_embedding_": "LoRA on embedding layers",
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
    ".bias": "trainable bias",
}


def tensor_key(module: str, which: str) -> str:
    """PEFT's saved name of a LoRA factor: which is 'A' or 'B'."""
    return f"base_model.model.{module}.lora_{which}.weight"


def parse_lora_tensors(tensors: Mapping[str, torch.Tensor], adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group PEFT LoRA tensors into {module: (A [r, d_in], B [d_out, r])}, refusing anything else."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            for marker, what in _UNSUPPORTED_KEYS.items():
                if marker in key:
                    raise UnsupportedAdapterError(f"{adapter}: {what} is not supported (tensor {key!r})")
            raise AdapterFormatError(f"{adapter}: unexpected tensor {key!r} in a LoRA adapter")
        factors.setdefault(match["module"], {})[match["which"]] = tensor
    if not factors:
        raise AdapterFormatError(f"{adapter}: the weights file holds no LoRA tensors")
    pairs = {}
    for module, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"{adapter}: module {module!r} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFormatError(
                f"{adapter}: {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                "expected [r, d_in] and [d_out, r]"
            )
        pairs[module] = (a, b)
    return pairs


@register_adapter_type
class LoraAdapter(Adapter):
    adapter_type = "lora"
    mergeable = True

    def __init__(self, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(name, tensors)
        self.config = config
        self.factors = parse_lora_tensors(tensors, name)
        for module, (a, _) in self.factors.items():
            expected = config.rank_for(module)
            if a.shape[0] != expected:
                raise AdapterFormatError(
                    f"{name}: {module!r} has rank {a.shape[0]} but the config (r / rank_pattern) says {expected}"
                )

    @classmethod
    def from_files(cls, name: str, config: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> "LoraAdapter":
        return cls(name, LoraConfig.from_dict(config, name), tensors)

    @classmethod
    def create(cls, name: str, layers: Mapping[str, LinearSpec], *, target_modules: list[str], rank: int,
               tasks: list[str] | None = None, seed: int = 0, lora_alpha: float | None = None,
               use_rslora: bool = False, **options: Any) -> "LoraAdapter":
        """LoRA init: A ~ kaiming-uniform(a=sqrt(5)), B = 0. The config is PEFT's, plus our adapter_type."""
        gen = torch.Generator().manual_seed(seed)
        tensors: dict[str, torch.Tensor] = {}
        for module, spec in select_layers(layers, target_modules).items():
            tensors[tensor_key(module, "A")] = kaiming_uniform((rank, spec.in_features), gen)
            tensors[tensor_key(module, "B")] = torch.zeros(spec.out_features, rank)
        config = {
            "adapter_type": "lora", "peft_type": "LORA", "r": rank, "lora_alpha": lora_alpha or 2.0 * rank,
            "use_rslora": use_rslora, "target_modules": list(target_modules), "bias": "none",
        }
        return cls(name, LoraConfig.from_dict(config, name), tensors)


    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.factors.values())

    def bind(self, layers: Mapping[str, LinearSpec], device: torch.device, dtype: torch.dtype) -> "BoundLowRank":
        require_modules(self, {m: (a.shape[1], b.shape[0]) for m, (a, b) in self.factors.items()}, layers)
        pairs = {
            m: (a.to(device, dtype), b.to(device, dtype), self.config.scale_for(m)) for m, (a, b) in self.factors.items()
        }
        return BoundLowRank(self, pairs)


class BoundLowRank(BoundAdapter):
    """One (A, B, s) per module: plain LoRA, and every family that reduces to it at load time."""

    stackable = True

    def __init__(self, adapter: Adapter, pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        super().__init__(adapter, frozenset(pairs))
        self.pairs = pairs

    def lowrank_factors(self, module: str, task: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        return self.pairs.get(module)

    def delta(self, module: str, x: torch.Tensor, h: torch.Tensor, task: int) -> torch.Tensor | None:
        pair = self.pairs.get(module)
        if pair is None:
            return None
        if self.dropout:
            x = torch.nn.functional.dropout(x, self.dropout)
        return lowrank_delta(x, *pair)

    def delta_weight(self, module: str, task: int) -> torch.Tensor | None:
        pair = self.pairs.get(module)
        return None if pair is None else lowrank_weight(*pair)

    def nbytes(self) -> int:
        """Bytes of the device factors, each tensor counted once (GIFT shares A across layers)."""
        unique = {id(t): t for a, b, _ in self.pairs.values() for t in (a, b)}
        return sum(t.numel() * t.element_size() for t in unique.values())
