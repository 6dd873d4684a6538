"""Hybrid LoRA + attention fusion (Beiranvand et al., JECEI 13(2) 2025), in the layer-level form whose
fusion follows AdapterFusion (Pfeiffer et al., arXiv 2005.00247): K source-task LoRAs at every adapted
linear, fused per token by attention with per-target-task query/key/value parameters. See bound.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..base import Adapter, kaiming_uniform, require_modules, select_layers
from ..errors import AdapterFormatError, UnsupportedAdapterError
from ..linear import LinearSpec
from ..lora import LoraAdapter
from ..registry import register_adapter_type
from .bound import BoundFusion, FusedModule
from .config import ADAPTER_TYPE, HybridConfig, SourceSpec
from .layout import fusion_key, parse_tensors, source_key

QUERY_KEY_STD = 0.02  # AdapterFusion's init_bert_weights: N(0, 0.02)


@register_adapter_type
class HybridAdapter(Adapter):
    adapter_type = ADAPTER_TYPE
    multi_task = True
    mergeable = False  # the attention weights depend on the activations

    def __init__(self, name: str, config: HybridConfig, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(name, tensors, config.tasks)
        self.config = config
        # only the shapes are kept: bind reads the tensors again, so in-place edits are always seen
        self.shapes = {m: (lay.d_in, lay.d_out) for m, lay in parse_tensors(config, tensors, name).items()}

    @classmethod
    def from_files(cls, name: str, config: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> "HybridAdapter":
        return cls(name, HybridConfig.from_dict(config, name), tensors)


    @property
    def rank(self) -> int:
        return max(s.r for s in self.config.sources)

    def bind(self, layers: Mapping[str, LinearSpec], device: torch.device, dtype: torch.dtype) -> BoundFusion:
        require_modules(self, self.shapes, layers)
        ranks = torch.tensor([s.r for s in self.config.sources])
        segments = torch.repeat_interleave(torch.eye(len(ranks)), ranks, dim=0)  # [R, K]
        fused = {}
        for module in sorted(self.shapes):
            fused[module] = self._fuse_module(module, segments, device, dtype)
        return BoundFusion(self, fused, self.config.attention_dim, self.config.temperature)

    def _fuse_module(self, module: str, segments: torch.Tensor, device: torch.device, dtype: torch.dtype) -> FusedModule:
        """The folds of bound.py, computed in (at least) fp32 and differentiably (no detach, no in-place writes)."""
        fold = torch.promote_types(dtype, torch.float32)

        def get(key: str) -> torch.Tensor:
            return self.tensors[key].to(device, fold)

        sources = self.config.sources
        a_scaled = torch.cat([get(source_key(k, module, "A")) * s.scaling for k, s in enumerate(sources)])  # [R, d_in]
        b_cat = torch.cat([get(source_key(k, module, "B")) for k in range(len(sources))], dim=1)  # [d_out, R]
        segments = segments.to(device, fold)
        tasks = []
        for t in range(len(self.tasks)):
            query = get(fusion_key(t, module, "query"))  # [d_a, d_out]
            kb = get(fusion_key(t, module, "key")) @ b_cat  # [d_a, R]
            bv = b_cat * (segments @ get(fusion_key(t, module, "value"))).t()  # [d_out, R]
            tasks.append((query.to(dtype), kb.to(dtype), bv.to(dtype)))
        return FusedModule(a_scaled.to(dtype), segments.to(dtype), tuple(tasks))

    @classmethod
    def create(cls, name: str, layers: Mapping[str, LinearSpec], *, target_modules: list[str], rank: int,
               tasks: list[str] | None = None, seed: int = 0, sources: Sequence[LoraAdapter] | None = None,
               attention_dim: int = 16, temperature: float = 1.0, fusion_dropout: float = 0.0,
               lora_alpha: float | None = None, **options: Any) -> "HybridAdapter":
        """A new fusion over K sources for the target `tasks`.

        sources=None: one fresh LoRA per target task (rank `rank`, A kaiming-uniform, B = 0, scaling
        lora_alpha / rank with lora_alpha = 2·rank by default, as `LoraAdapter.create`). Otherwise the
        factors and per-module scalings of the given LoRAs are copied (`rank` is then unused); they must all
        adapt exactly the modules that `target_modules` selects. Fusion init (AdapterFusion): query and key
        ~ N(0, 0.02), value gains 1, so the fused delta starts near the mean of the source deltas."""
        if options:
            raise UnsupportedAdapterError(f"{name}: hybrid create() has no option(s) {', '.join(sorted(options))}")
        if not tasks:
            raise AdapterFormatError(f"{name}: a hybrid adapter needs its target tasks")
        chosen = select_layers(layers, target_modules)
        gen = torch.Generator().manual_seed(seed)
        tensors: dict[str, torch.Tensor] = {}
        if sources is None:
            scaling = float(lora_alpha or 2.0 * rank) / rank
            specs = [SourceSpec(task, rank, scaling) for task in tasks]
            for k in range(len(specs)):
                for module, spec in chosen.items():
                    tensors[source_key(k, module, "A")] = kaiming_uniform((rank, spec.in_features), gen)
                    tensors[source_key(k, module, "B")] = torch.zeros(spec.out_features, rank)
        else:
            specs = _copy_sources(name, sources, chosen, layers, tensors)
        d_a = attention_dim
        for t in range(len(tasks)):
            for module, spec in chosen.items():
                tensors[fusion_key(t, module, "query")] = torch.randn(d_a, spec.out_features, generator=gen) * QUERY_KEY_STD
                tensors[fusion_key(t, module, "key")] = torch.randn(d_a, spec.out_features, generator=gen) * QUERY_KEY_STD
                tensors[fusion_key(t, module, "value")] = torch.ones(len(specs), spec.out_features)
        target = list(target_modules) if not isinstance(target_modules, str) else target_modules
        config = HybridConfig.from_dict(
            HybridConfig(list(tasks), specs, target, attention_dim, float(temperature), float(fusion_dropout)).to_dict(),
            name,
        )
        return cls(name, config, tensors)


def _copy_sources(name: str, sources: Sequence[LoraAdapter], chosen: Mapping[str, LinearSpec],
                  layers: Mapping[str, LinearSpec], tensors: dict[str, torch.Tensor]) -> list[SourceSpec]:
    """Copy the source LoRAs' factors into `tensors`; refuse sources that do not adapt the same modules.

    Our format keeps one (r, scaling) per source. A source whose alpha_pattern gives some module another
    scale has that ratio folded into the copied B (exact); one whose rank differs by module is refused."""
    if not sources:
        raise AdapterFormatError(f"{name}: sources must list at least one LoRA adapter")
    specs = []
    for k, src in enumerate(sources):
        if not isinstance(src, LoraAdapter):
            raise AdapterFormatError(f"{name}: source {k} is a {type(src).__name__}, not a LoraAdapter")
        if set(src.factors) != set(chosen):
            extra, missing = sorted(set(src.factors) - set(chosen)), sorted(set(chosen) - set(src.factors))
            raise AdapterFormatError(
                f"{name}: source {k} ({src.name!r}) does not adapt the modules target_modules selects "
                f"(extra: {extra[:3]}, missing: {missing[:3]}); all sources must adapt the same modules"
            )
        require_modules(src, {m: (a.shape[1], b.shape[0]) for m, (a, b) in src.factors.items()}, layers)
        modules = sorted(src.factors)
        ranks = {src.factors[m][0].shape[0] for m in modules}
        if len(ranks) != 1:
            raise UnsupportedAdapterError(f"{name}: source {src.name!r} has different ranks per module ({sorted(ranks)})")
        scales = {m: float(src.config.scale_for(m)) for m in modules}
        scaling = scales[modules[0]]
        if scaling == 0.0 and any(scales.values()):
            raise UnsupportedAdapterError(f"{name}: source {src.name!r} has scaling 0 on some modules but not all")
        for module in modules:
            a, b = src.factors[module]
            ratio = scales[module] / scaling if scaling else 1.0
            tensors[source_key(k, module, "A")] = a.detach().float().clone()
            tensors[source_key(k, module, "B")] = b.detach().float().clone() * ratio
        specs.append(SourceSpec(src.name, ranks.pop(), scaling))
    return specs
