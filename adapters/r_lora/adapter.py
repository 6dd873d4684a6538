"""R-LoRA (Liu, Chang, Wu, arXiv 2502.15455; code jinda-liu/R-LoRA): multi-head LoRA with a token router.

    y = x Wᵀ + b + s · Σ_i g_i(x) · drop_i(x Aᵀ) B_iᵀ  +  (x A⁰ᵀ) B_offᵀ,    g = softmax(x W_rᵀ)

One shared A [r, d_in], N heads B_i [d_out, r], a router W_r [N, d_in]. The last term is the static
correction of the training-time base-weight offset W ← W − (s/N)·Σ_i B_i⁰ A⁰ (adapter-methods.md §3.5),
which the released code applies to the base weights and never saves: here it travels with the adapter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..base import Adapter, BoundAdapter, expect_shape, kaiming_uniform, require_modules, select_layers
from ..errors import AdapterFormatError
from ..linear import LinearSpec
from ..ops import softmax_fp32
from ..registry import register_adapter_type
from ..targets import matches_target, split_param_name
from .config import ADAPTER_TYPE, RLoraConfig

TRAINED = ("lora_A", "lora_B", "lora_router")
OFFSET = ("offset_A", "offset_B")


def tensor_key(module: str, param: str) -> str:
    """Saved name of one tensor: `<module>.<param>`, param in TRAINED or OFFSET."""
    return f"{module}.{param}"


def group_tensors(tensors: Mapping[str, torch.Tensor], config: RLoraConfig,
                  adapter: str) -> dict[str, dict[str, torch.Tensor]]:
    """Group `<module>.<param>` tensors by module and check every shape against the config."""
    params = TRAINED + OFFSET if config.offset else TRAINED
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        split = split_param_name(key, TRAINED + OFFSET)
        if split is None or (split[1] in OFFSET and not config.offset):
            why = " (config offset is false)" if split is not None else ""
            raise AdapterFormatError(f"{adapter}: unexpected tensor {key!r} in an r_lora adapter{why}")
        modules.setdefault(split[0], {})[split[1]] = tensor
    if not modules:
        raise AdapterFormatError(f"{adapter}: the weights file holds no r_lora tensors")
    n, r = config.num_heads, config.r
    for module, found in sorted(modules.items()):
        if not matches_target(module, config.target_modules):
            raise AdapterFormatError(f"{adapter}: module {module!r} is not in target_modules {config.target_modules!r}")
        a = found.get("lora_A")
        b = found.get("lora_B")
        if a is None or b is None:
            missing = "lora_A" if a is None else "lora_B"
            raise AdapterFormatError(f"{adapter}: tensor {tensor_key(module, missing)!r} is missing")
        if a.dim() != 2 or b.dim() != 3:
            raise AdapterFormatError(
                f"{adapter}: {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                "expected [r, d_in] and [num_heads, d_out, r]"
            )
        d_in, d_out = a.shape[1], b.shape[1]
        if b.shape[0] != n:
            raise AdapterFormatError(f"{adapter}: {module!r} has {b.shape[0]} B heads but num_heads is {n}")
        expected = {"lora_A": (r, d_in), "lora_B": (n, d_out, r), "lora_router": (n, d_in),
                    "offset_A": (r, d_in), "offset_B": (d_out, r)}
        for param in params:
            expect_shape(found, param, expected[param], f"{adapter}: {module!r}")
    return modules


@register_adapter_type
class RLoraAdapter(Adapter):
    adapter_type = ADAPTER_TYPE
    multi_task = True  # the config carries a task list, but the router ignores the task (§3.4)

    def __init__(self, name: str, config: RLoraConfig, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(name, tensors, config.tasks)
        self.config = config
        self.modules = group_tensors(tensors, config, name)

    @classmethod
    def from_files(cls, name: str, config: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> "RLoraAdapter":
        return cls(name, RLoraConfig.from_dict(config, name), tensors)

    @classmethod
    def create(cls, name: str, layers: Mapping[str, LinearSpec], *, target_modules: list[str], rank: int,
               tasks: list[str] | None = None, seed: int = 0, num_heads: int = 5, lora_alpha: float | None = None,
               scaling: float | None = None, dropout: float = 0.1, init_gamma: float = 64.0, offset: bool = True,
               **options: Any) -> "RLoraAdapter":
        """The paper's init (Table 1): A ~ (d_out^¼/√γ)·N(0, 1/d_in), B_i ~ (d_out^¼/√γ)·N(0, 1/d_out) per head,
        router kaiming-uniform(a=√5). s defaults to α/√r (the released code's rank-stabilised setting), and
        with `offset` the pair (A⁰, −(s/N)·Σ_i B_i⁰) cancels the adapter exactly under uniform gates."""
        if options:
            raise TypeError(f"r_lora create got unknown options {sorted(options)}")
        alpha = float(lora_alpha) if lora_alpha is not None else 2.0 * rank
        config = RLoraConfig(
            tasks=list(tasks or []), r=rank, num_heads=num_heads, lora_alpha=alpha,
            scaling=float(scaling) if scaling is not None else alpha / math.sqrt(rank), dropout=dropout,
            init_gamma=init_gamma, target_modules=list(target_modules), offset=offset,
        )
        config.check(name)
        gen = torch.Generator().manual_seed(seed)
        tensors: dict[str, torch.Tensor] = {}
        for module, spec in select_layers(layers, target_modules).items():
            d_in, d_out = spec.in_features, spec.out_features
            stable = d_out**0.25 / math.sqrt(init_gamma)
            a = torch.randn(rank, d_in, generator=gen) * (stable / math.sqrt(d_in))  # [r, d_in]
            b = torch.randn(num_heads, d_out, rank, generator=gen) * (stable / math.sqrt(d_out))  # [N, d_out, r]
            tensors[tensor_key(module, "lora_A")] = a
            tensors[tensor_key(module, "lora_B")] = b
            tensors[tensor_key(module, "lora_router")] = kaiming_uniform((num_heads, d_in), gen)  # [N, d_in]
            if offset:
                tensors[tensor_key(module, "offset_A")] = a.clone()
                tensors[tensor_key(module, "offset_B")] = b.sum(0) * (-config.scaling / num_heads)  # [d_out, r]
        return cls(name, config, tensors)


    @property
    def rank(self) -> int:
        return self.config.r

    def num_parameters(self) -> int:
        """Trainable tensors only: r·d_in + N·r·d_out + N·d_in per module (§3.7); the offsets are fixed."""
        return sum(t[p].numel() for t in self.modules.values() for p in TRAINED)

    def bind(self, layers: Mapping[str, LinearSpec], device: torch.device, dtype: torch.dtype) -> "BoundRLora":
        require_modules(self, {m: (t["lora_A"].shape[1], t["lora_B"].shape[1]) for m, t in self.modules.items()},
                        layers)
        return BoundRLora(self, {m: _fuse(t, self.config, device, dtype) for m, t in self.modules.items()})


@dataclass(frozen=True)
class FusedModule:
    """One module's R-LoRA as two GEMM operands (§3.6).

    down = [W_r; A; A⁰]            [N + r (+ r), d_in]   router logits, shared code u, offset code
    up   = [s·B_1 | … | s·B_N | B_off]   [d_out, N·r (+ r)]  so that Σ_i g_i u B_iᵀ = ũ B_catᵀ in one matmul
    """

    down: torch.Tensor
    up: torch.Tensor
    heads: int
    rank: int


def _fuse(t: Mapping[str, torch.Tensor], config: RLoraConfig, device: torch.device, dtype: torch.dtype) -> FusedModule:
    """Differentiable layout of one module's tensors (no detach, no in-place writes)."""
    n, r = config.num_heads, config.r
    b = t["lora_B"].to(device, dtype)  # [N, d_out, r]
    b_cat = b.permute(1, 0, 2).reshape(b.shape[1], n * r)  # [d_out, N·r], column i·r + j = head i, rank j
    down = [t["lora_router"], t["lora_A"]] + ([t["offset_A"]] if config.offset else [])
    up = [b_cat * config.scaling] + ([t["offset_B"].to(device, dtype)] if config.offset else [])
    return FusedModule(torch.cat([d.to(device, dtype) for d in down]), torch.cat(up, dim=1), n, r)


class BoundRLora(BoundAdapter):
    """R-LoRA on one base model. Content-routed: every task of the adapter shares one group of rows."""

    def __init__(self, adapter: RLoraAdapter, fused: dict[str, FusedModule]) -> None:
        super().__init__(adapter, frozenset(fused))
        self.task_sensitive = False  # the router reads x, never the task (§3.4)
        self.fused = fused

    def gates(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """The router's per-token head weights g = softmax_fp32(x W_rᵀ): x [n, d_in] -> [n, N]."""
        f = self.fused[module]
        return softmax_fp32(x @ f.down[: f.heads].t())

    def delta(self, module: str, x: torch.Tensor, h: torch.Tensor, task: int) -> torch.Tensor | None:
        f = self.fused.get(module)
        if f is None:
            return None
        n, heads, r = x.shape[0], f.heads, f.rank
        z = x @ f.down.t()  # [n, N + r (+ r)]: one shrink GEMM for router, code and offset code
        g = softmax_fp32(z[:, :heads])  # [n, N]
        u = z[:, heads: heads + r]  # [n, r]
        per_head = u[:, None, :]  # [n, 1, r]: at inference every head sees the same u
        if self.dropout:  # Multi-Head Dropout: an independent mask per head on the shared code
            per_head = torch.nn.functional.dropout(per_head.expand(n, heads, r), self.dropout)  # [n, N, r]
        mixed = (g[:, :, None] * per_head).reshape(n, heads * r)  # ũ [n, N·r]
        if z.shape[1] > heads + r:
            mixed = torch.cat([mixed, z[:, heads + r:]], dim=1)  # [n, N·r + r]
        return mixed @ f.up.t()  # [n, d_out]: one expand GEMM

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for f in self.fused.values() for t in (f.down, f.up))
