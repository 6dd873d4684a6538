"""MTL-LoRA (Yang et al., arXiv 2410.09437; code pUmpKin-Co/MTL-LoRA `mLoRALinear`), adapter-methods.md §2.

For the rows of task t:  y = x Wᵀ + b + s · ((drop(x) Aᵀ) Λ_tᵀ) B̃_tᵀ,  B̃_t = Σ_i softmax(ω_t / τ)_i · B_i.
A and the B_i are shared by all tasks; Λ_t and the mixing logits ω_t are per task.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..base import Adapter, BoundAdapter, expect_shape, kaiming_uniform, require_modules, select_layers
from ..errors import AdapterFormatError, UnsupportedAdapterError
from ..linear import LinearSpec
from ..ops import lowrank_delta, lowrank_weight, softmax_fp32
from ..registry import register_adapter_type
from ..targets import matches_target, split_param_name
from .config import ADAPTER_TYPE, MtlLoraConfig

PARAMS = ("lora_A", "lora_lambda", "lora_B", "lora_omega")


def tensor_key(module: str, param: str) -> str:
    """Stored name of one MTL-LoRA tensor: `<full module path>.<param>`, param in PARAMS."""
    return f"{module}.{param}"


def parse_tensors(tensors: Mapping[str, torch.Tensor], config: MtlLoraConfig,
                  adapter: str) -> dict[str, tuple[int, int]]:
    """Check names and shapes of every tensor against the config; return {module: (d_in, d_out)}."""
    modules: dict[str, set[str]] = {}
    for key in tensors:
        split = split_param_name(key, PARAMS)
        if split is None:
            raise AdapterFormatError(f"{adapter}: unexpected tensor {key!r} in an mtl_lora adapter")
        modules.setdefault(split[0], set()).add(split[1])
    if not modules:
        raise AdapterFormatError(f"{adapter}: the weights file holds no mtl_lora tensors")
    r, n, num_tasks = config.r, config.num_b, len(config.tasks)
    shapes: dict[str, tuple[int, int]] = {}
    for module in sorted(modules):
        for param in PARAMS:
            if param not in modules[module]:
                raise AdapterFormatError(f"{adapter}: tensor {tensor_key(module, param)!r} is missing")
        if not matches_target(module, config.target_modules):
            raise AdapterFormatError(f"{adapter}: module {module!r} is not named by target_modules")
        a, b = tensors[tensor_key(module, "lora_A")], tensors[tensor_key(module, "lora_B")]
        if a.dim() != 2 or b.dim() != 3:
            raise AdapterFormatError(
                f"{adapter}: {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                "expected [r, d_in] and [num_b, d_out, r]"
            )
        d_in, d_out = a.shape[1], b.shape[1]
        lam_shape = (num_tasks, r) if config.diagonal else (num_tasks, r, r)
        expect_shape(tensors, tensor_key(module, "lora_A"), (r, d_in), adapter)
        expect_shape(tensors, tensor_key(module, "lora_lambda"), lam_shape, adapter)
        expect_shape(tensors, tensor_key(module, "lora_B"), (n, d_out, r), adapter)
        expect_shape(tensors, tensor_key(module, "lora_omega"), (num_tasks, n), adapter)
        shapes[module] = (d_in, d_out)
    return shapes


@register_adapter_type
class MtlLoraAdapter(Adapter):
    adapter_type = ADAPTER_TYPE
    multi_task = True
    mergeable = True

    def __init__(self, name: str, config: MtlLoraConfig, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(name, tensors, config.tasks)
        self.config = config
        self.shapes = parse_tensors(tensors, config, name)  # {module: (d_in, d_out)}

    @classmethod
    def from_files(cls, name: str, config: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> "MtlLoraAdapter":
        return cls(name, MtlLoraConfig.from_dict(config, name), tensors)

    @classmethod
    def create(cls, name: str, layers: Mapping[str, LinearSpec], *, target_modules: list[str], rank: int,
               tasks: list[str] | None = None, seed: int = 0, lora_alpha: float | None = None,
               scaling: float | None = None, num_b: int = 3, temperature: float = 0.1, lambda_format: str = "full",
               dropout: float = 0.05, **options: Any) -> "MtlLoraAdapter":
        """The released code's init: A ~ kaiming-uniform(a=√5), Λ_t = I (ones if diagonal), B_i = 0,
        ω ~ kaiming-uniform(a=√5) on [T, n] (bound 1/√n). Defaults: α = 2r, s = α/r, n = 3, τ = 0.1
        (the Llama-2 training script)."""
        if options:
            raise UnsupportedAdapterError(f"{name}: unknown mtl_lora option(s) {', '.join(sorted(options))}")
        alpha = float(lora_alpha) if lora_alpha is not None else 2.0 * rank
        config = MtlLoraConfig.from_dict({
            "adapter_type": ADAPTER_TYPE, "tasks": list(tasks or []), "r": rank, "lora_alpha": alpha,
            "scaling": float(scaling) if scaling is not None else alpha / rank, "num_b": num_b,
            "temperature": temperature, "lambda_format": lambda_format, "target_modules": target_modules,
            "dropout": dropout,
        }, name)
        num_tasks = len(config.tasks)
        gen = torch.Generator().manual_seed(seed)
        tensors: dict[str, torch.Tensor] = {}
        for module, spec in select_layers(layers, target_modules).items():
            tensors[tensor_key(module, "lora_A")] = kaiming_uniform((rank, spec.in_features), gen)  # [r, d_in]
            tensors[tensor_key(module, "lora_lambda")] = (
                torch.ones(num_tasks, rank) if config.diagonal else torch.eye(rank).repeat(num_tasks, 1, 1)
            )  # [T, r] or [T, r, r]
            tensors[tensor_key(module, "lora_B")] = torch.zeros(num_b, spec.out_features, rank)  # [n, d_out, r]
            tensors[tensor_key(module, "lora_omega")] = kaiming_uniform((num_tasks, num_b), gen)  # [T, n]
        return cls(name, config, tensors)


    @property
    def rank(self) -> int:
        return self.config.r

    def bind(self, layers: Mapping[str, LinearSpec], device: torch.device, dtype: torch.dtype) -> "BoundMtlLora":
        require_modules(self, self.shapes, layers)
        return BoundMtlLora(self, {m: self._layout(m, device, dtype) for m in self.shapes})

    def _layout(self, module: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(A [r, d_in], Λ [T, r, r], B̃ [T, d_out, r]) of one module on the serving device and dtype."""
        t = {p: self.tensors[tensor_key(module, p)].to(device) for p in PARAMS}
        lam = t["lora_lambda"].to(dtype)
        if self.config.diagonal:  # as the released code does: diag_embed, then the same r×r product
            lam = torch.diag_embed(lam)  # [T, r, r]
        mix = softmax_fp32(t["lora_omega"].float() / self.config.temperature)  # [T, n], fp32
        b_mix = torch.einsum("tn,nor->tor", mix, t["lora_B"].float())  # [T, d_out, r]
        return t["lora_A"].to(dtype), lam, b_mix.to(dtype)


class BoundMtlLora(BoundAdapter):
    """A shared A, per-task Λ_t and precomputed per-task B̃_t for every adapted module."""

    stackable = True

    def __init__(self, adapter: MtlLoraAdapter, layout: dict[str, tuple[torch.Tensor, ...]]) -> None:
        super().__init__(adapter, frozenset(layout))
        self.layout = layout
        self.scaling = adapter.config.scaling

    def lowrank_factors(self, module: str, task: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """Task t as a plain pair: A'_t = Λ_t A [r, d_in], B̃_t [d_out, r] (adapter-methods.md §2.5)."""
        entry = self.layout.get(module)
        if entry is None:
            return None
        a, lam, b_mix = entry
        return lam[task] @ a, b_mix[task], self.scaling

    def delta(self, module: str, x: torch.Tensor, h: torch.Tensor, task: int) -> torch.Tensor | None:
        entry = self.layout.get(module)
        if entry is None:
            return None
        a, lam, b_mix = entry
        if self.dropout:
            x = torch.nn.functional.dropout(x, self.dropout)
        u = x @ a.t()  # [n, r]: the shrink is shared by all tasks
        return lowrank_delta(u, lam[task], b_mix[task], self.scaling)  # s · (u Λ_tᵀ) B̃_tᵀ -> [n, d_out]

    def delta_weight(self, module: str, task: int) -> torch.Tensor | None:
        """ΔW_t = s · B̃_t Λ_t A in fp32 (exact: the adapter is linear in x)."""
        entry = self.layout.get(module)
        if entry is None:
            return None
        a, lam, b_mix = entry
        return lowrank_weight(lam[task].float() @ a.float(), b_mix[task], self.scaling)  # [d_out, d_in]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for entry in self.layout.values() for t in entry)
