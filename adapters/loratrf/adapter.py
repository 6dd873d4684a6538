"""LoRATRF (Li et al., arXiv 2412.09827), as the interim task-aware filter of adapter-methods.md §5.2.

    u = drop(x) Aᵀ                  [n, r]   LoRA features
    f = σ(u Fᵀ + c)                 [n, r]   task-aware filter, one gate per feature and token
    y = x Wᵀ + b + s · (f ⊙ u) Bᵀ   [n, d_out]

The gate depends on the input, so ΔW is not a fixed matrix: the adapter cannot be merged. With F = 0 the
gate is the constant σ(c) and the adapter is exactly a LoRA with B · diag(σ(c)).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from ..base import Adapter, BoundAdapter, expect_shape, kaiming_uniform, require_modules, select_layers
from ..errors import AdapterFormatError, UnsupportedAdapterError
from ..linear import LinearSpec
from ..registry import register_adapter_type
from ..targets import matches_target, split_param_name
from .config import ADAPTER_TYPE, DEFAULT_DROPOUT, DEFAULT_FILTER_BIAS_INIT, INTERPRETATION, LoraTRFConfig

PARAMS = ("lora_A", "lora_B", "filter_weight", "filter_bias")


def tensor_key(module: str, param: str) -> str:
    """The saved name of one tensor: `<full module path>.<param>`, param in PARAMS."""
    return f"{module}.{param}"


class TRFFactors(NamedTuple):
    """One module's tensors: A [r, d_in], B [d_out, r], F [r, r], c [r]."""

    a: torch.Tensor
    b: torch.Tensor
    f: torch.Tensor
    c: torch.Tensor


def trf_delta(x: torch.Tensor, factors: TRFFactors, scale: float) -> torch.Tensor:
    """s · (σ(u Fᵀ + c) ⊙ u) Bᵀ with u = x Aᵀ.  x [n, d_in] -> [n, d_out]."""
    u = x @ factors.a.t()  # [n, r]
    gate = torch.sigmoid(u @ factors.f.t() + factors.c)  # [n, r]
    return (gate * u * scale) @ factors.b.t()  # [n, d_out]


def parse_tensors(tensors: Mapping[str, torch.Tensor], config: LoraTRFConfig, adapter: str) -> dict[str, TRFFactors]:
    """Group the flat tensors by module and check every shape against r and each other."""
    modules: dict[str, set[str]] = {}
    for key in tensors:
        split = split_param_name(key, PARAMS)
        if split is None:
            raise AdapterFormatError(f"{adapter}: unexpected tensor {key!r} in a loratrf adapter")
        modules.setdefault(split[0], set()).add(split[1])
    if not modules:
        raise AdapterFormatError(f"{adapter}: the weights file holds no loratrf tensors")
    r = config.r
    factors: dict[str, TRFFactors] = {}
    for module in sorted(modules):
        if not matches_target(module, config.target_modules):
            raise AdapterFormatError(f"{adapter}: module {module!r} is not named by target_modules {config.target_modules!r}")
        for param in PARAMS:
            if param not in modules[module]:
                raise AdapterFormatError(f"{adapter}: tensor {tensor_key(module, param)!r} is missing")
        a, b = tensors[tensor_key(module, "lora_A")], tensors[tensor_key(module, "lora_B")]
        if a.dim() != 2 or a.shape[0] != r or a.shape[1] == 0:
            raise AdapterFormatError(f"{adapter}: tensor {tensor_key(module, 'lora_A')!r} has shape {tuple(a.shape)}, expected [{r}, d_in]")
        if b.dim() != 2 or b.shape[1] != r or b.shape[0] == 0:
            raise AdapterFormatError(f"{adapter}: tensor {tensor_key(module, 'lora_B')!r} has shape {tuple(b.shape)}, expected [d_out, {r}]")
        factors[module] = TRFFactors(
            a, b,
            expect_shape(tensors, tensor_key(module, "filter_weight"), (r, r), adapter),
            expect_shape(tensors, tensor_key(module, "filter_bias"), (r,), adapter),
        )
    return factors


@register_adapter_type
class LoraTRFAdapter(Adapter):
    adapter_type = ADAPTER_TYPE
    multi_task = False  # one adapter per task; the request's adapter id selects it
    mergeable = False  # the filter depends on the input

    def __init__(self, name: str, config: LoraTRFConfig, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(name, tensors)
        self.config = config
        # views of `tensors` (not copies), so that in-place writes to the tensors are seen by `bind`
        self.factors = parse_tensors(tensors, config, name)

    @classmethod
    def from_files(cls, name: str, config: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> "LoraTRFAdapter":
        return cls(name, LoraTRFConfig.from_dict(config, name), tensors)

    @classmethod
    def create(cls, name: str, layers: Mapping[str, LinearSpec], *, target_modules: list[str], rank: int,
               tasks: list[str] | None = None, seed: int = 0, lora_alpha: float | None = None,
               dropout: float = DEFAULT_DROPOUT, filter_bias_init: float = DEFAULT_FILTER_BIAS_INIT,
               **options: Any) -> "LoraTRFAdapter":
        """Init (spec §5.2): A ~ kaiming-uniform(a=√5), B = 0, F = 0, c = filter_bias_init; s = α / r.

        At init f = σ(c) for every token, so the adapter is a LoRA with B · diag(σ(c)) (= 0, since B = 0)."""
        if options:
            raise UnsupportedAdapterError(f"loratrf create: unknown option(s) {', '.join(sorted(options))}")
        alpha = float(lora_alpha if lora_alpha is not None else 2.0 * rank)
        config = LoraTRFConfig.from_dict({
            "adapter_type": ADAPTER_TYPE, "r": rank, "lora_alpha": alpha, "scaling": alpha / rank,
            "target_modules": list(target_modules), "dropout": dropout, "filter_bias_init": filter_bias_init,
            "interpretation": INTERPRETATION,
        }, name)
        gen = torch.Generator().manual_seed(seed)
        tensors: dict[str, torch.Tensor] = {}
        for module, spec in select_layers(layers, target_modules).items():
            tensors[tensor_key(module, "lora_A")] = kaiming_uniform((rank, spec.in_features), gen)
            tensors[tensor_key(module, "lora_B")] = torch.zeros(spec.out_features, rank)
            tensors[tensor_key(module, "filter_weight")] = torch.zeros(rank, rank)
            tensors[tensor_key(module, "filter_bias")] = torch.full((rank,), float(filter_bias_init))
        return cls(name, config, tensors)


    @property
    def rank(self) -> int:
        return self.config.r

    def bind(self, layers: Mapping[str, LinearSpec], device: torch.device, dtype: torch.dtype) -> "BoundLoraTRF":
        require_modules(self, {m: (t.a.shape[1], t.b.shape[0]) for m, t in self.factors.items()}, layers)
        laid_out = {m: TRFFactors(*(p.to(device, dtype) for p in t)) for m, t in self.factors.items()}
        return BoundLoraTRF(self, laid_out, self.config.scaling)


class BoundLoraTRF(BoundAdapter):
    """Per module (A, B, F, c) and one scaling s. `delta_weight` is refused by the base class."""

    def __init__(self, adapter: Adapter, factors: dict[str, TRFFactors], scale: float) -> None:
        super().__init__(adapter, frozenset(factors))
        self.factors = factors
        self.scale = scale

    def delta(self, module: str, x: torch.Tensor, h: torch.Tensor, task: int) -> torch.Tensor | None:
        factors = self.factors.get(module)
        if factors is None:
            return None
        if self.dropout:
            x = torch.nn.functional.dropout(x, self.dropout)
        return trf_delta(x, factors, self.scale)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for t in self.factors.values() for p in t)
