"""GIFT (Savadikar et al., arXiv 2312.00700): ΔW_ℓ = W_ℓ · φ · ψ with Θ = (φ, ψ) shared across layers.

Served as LoRA: at bind time every adapted layer gets the pair A = ψ [r, d_in] (one tensor per Θ, shared by
its layers) and B_ℓ = W_ℓ φ [d_out, r], scale 1, so that the per-token cost equals LoRA's rank-r cost and
the reference code's per-call recomputation of ΔW disappears.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..base import Adapter, expect_shape, kaiming_uniform, require_modules, select_layers
from ..errors import AdapterFormatError, IncompatibleAdapterError, UnsupportedAdapterError
from ..linear import LinearSpec
from ..lora import BoundLowRank
from ..registry import register_adapter_type
from .config import ADAPTER_TYPE, GiftConfig


def tensor_key(theta: str, which: str) -> str:
    """Stored name of a Θ factor: which is 'phi' ([d_in, r]) or 'psi' ([r, d_in])."""
    return f"gift.{theta}.{which}"


@register_adapter_type
class GiftAdapter(Adapter):
    adapter_type = ADAPTER_TYPE
    mergeable = True

    def __init__(self, name: str, config: GiftConfig, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(name, tensors)
        self.config = config
        expected = {tensor_key(k, w) for k in config.theta_keys() for w in ("phi", "psi")}
        unexpected = sorted(set(tensors) - expected)
        if unexpected:
            raise AdapterFormatError(f"{name}: unexpected tensor {unexpected[0]!r} in a GIFT adapter")
        for key in config.theta_keys():
            phi_name = tensor_key(key, "phi")
            if phi_name not in tensors:
                raise AdapterFormatError(f"{name}: tensor {phi_name!r} is missing")
            phi = tensors[phi_name]  # [d_in, r]
            if phi.dim() != 2 or phi.shape[1] != config.r or phi.shape[0] == 0:
                raise AdapterFormatError(
                    f"{name}: tensor {phi_name!r} has shape {tuple(phi.shape)}, expected [d_in, {config.r}]"
                )
            expect_shape(tensors, tensor_key(key, "psi"), (config.r, phi.shape[0]), name)  # [r, d_in]

    @classmethod
    def from_files(cls, name: str, config: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> "GiftAdapter":
        return cls(name, GiftConfig.from_dict(config, name), tensors)

    @classmethod
    def create(cls, name: str, layers: Mapping[str, LinearSpec], *, target_modules: list[str], rank: int,
               tasks: list[str] | None = None, seed: int = 0, share_projections: bool = False,
               **options: Any) -> "GiftAdapter":
        """The reference code's init: φ is nn.Linear(d_in, r)'s weight transposed, U(±1/√d_in); ψ = 0."""
        if options:
            raise UnsupportedAdapterError(f"{name}: GIFT has no option {sorted(options)[0]!r}")
        raw = {"adapter_type": ADAPTER_TYPE, "r": rank, "target_modules": target_modules,
               "share_projections": share_projections, "scaling": 1.0}
        checked = GiftConfig.from_dict(raw, name)  # validates the targets before they are matched
        targets = checked.target_modules if share_projections else _isotropic_targets(layers, checked.target_modules)
        config = GiftConfig.from_dict({**raw, "target_modules": targets}, name)
        widths: dict[str, set[int]] = {}
        for target in targets:
            for spec in select_layers(layers, [target]).values():
                widths.setdefault(config.theta_key(target), set()).add(spec.in_features)
        if any(len(w) > 1 for w in widths.values()):
            raise IncompatibleAdapterError(
                f"{name}: share_projections needs one input width (d_in), but {targets} have "
                f"{sorted(set().union(*widths.values()))}; use share_projections=false"
            )
        d_in = {key: w.pop() for key, w in widths.items()}
        gen = torch.Generator().manual_seed(seed)
        tensors: dict[str, torch.Tensor] = {}
        for key in config.theta_keys():
            tensors[tensor_key(key, "phi")] = kaiming_uniform((rank, d_in[key]), gen).t().contiguous()  # [d_in, r]
            tensors[tensor_key(key, "psi")] = torch.zeros(rank, d_in[key])  # [r, d_in]
        return cls(name, config, tensors)


    @property
    def rank(self) -> int:
        return self.config.r

    def layer_thetas(self, layers: Mapping[str, LinearSpec]) -> dict[str, str]:
        """{base layer name: Θ key}; IncompatibleAdapterError where a target matches no layer."""
        out: dict[str, str] = {}
        for target in self.config.target_modules:
            for module in select_layers(layers, [target]):
                out[module] = self.config.theta_key(target)
        return out

    def bind(self, layers: Mapping[str, LinearSpec], device: torch.device, dtype: torch.dtype) -> BoundLowRank:
        thetas = self.layer_thetas(layers)
        require_modules(self, {m: (self.tensors[tensor_key(k, "psi")].shape[1], None) for m, k in thetas.items()}, layers)
        keys = set(thetas.values())
        a = {k: self.tensors[tensor_key(k, "psi")].to(device, dtype) for k in keys}  # [r, d_in]
        phi = {k: self.tensors[tensor_key(k, "phi")].float() for k in keys}  # [d_in, r]
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for module, key in thetas.items():
            w = layers[module].weight()  # [d_out, d_in], on the model's device
            b = (w.float() @ phi[key].to(w.device)).to(device, dtype)  # B_ℓ = W_ℓ φ in fp32: [d_out, r]
            pairs[module] = (a[key], b, 1.0)
        return BoundLowRank(self, pairs)


def _isotropic_targets(layers: Mapping[str, LinearSpec], targets: list[str]) -> list[str]:
    """Split a module type whose layers differ in d_in (GPT-2's attn.c_proj [32] and mlp.c_proj [128]) into
    one dotted suffix per role, so that every Θ fits all of its layers. Other targets stay as given."""
    out: list[str] = []
    for target in targets:
        chosen = select_layers(layers, [target])
        if len({spec.in_features for spec in chosen.values()}) == 1:
            out.append(target)
            continue
        depth = target.count(".") + 2  # one more component than the target names: `c_proj` -> `attn.c_proj`
        roles: dict[str, set[int]] = {}
        for module, spec in chosen.items():
            roles.setdefault(".".join(module.split(".")[-depth:]), set()).add(spec.in_features)
        if any(len(widths) > 1 for widths in roles.values()):
            raise IncompatibleAdapterError(f"target {target!r} covers layers of different input widths (d_in)")
        out.extend(roles)
    return out
