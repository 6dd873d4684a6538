"""GIFT config: rank, the module types that get a Θ, whether one Θ is shared by all of them, and s = 1."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..base import get_field
from ..errors import AdapterFormatError, UnsupportedAdapterError

ADAPTER_TYPE = "gift"
SHARED_KEY = "shared"  # the Θ key when share_projections is true
# a module type (`q_proj`) or a dotted suffix of module names (`attn.c_proj`)
_TARGET = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_OWN_KEYS = {"adapter_type", "r", "target_modules", "share_projections", "scaling"}

# Options of the reference code (`GIFTConfig`) that change the forward pass and that we do not implement:
# key -> (values that are harmless, what to call it in the message). Refused, never ignored.
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "in_projection_bias": ((None, False), "a bias on the in-projection φ (in_projection_bias)"),
    "out_projection_bias": ((None, False), "a bias on the out-projection ψ (out_projection_bias)"),
    "enable_gift": ((None, {}), "per-sub-projection GIFT on fused layers (enable_gift)"),
    "layers_to_transform": ((None, [], ()), "layers_to_transform"),
    "layers_pattern": ((None, [], ""), "layers_pattern"),
}
_SIMPLE_BLOCKS = ({"block_type": "simple_block"}, {"block_type": "simple_block", "act_layer": "identity"})


@dataclass
class GiftConfig:
    r: int
    target_modules: list[str]
    share_projections: bool = False
    scaling: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)  # unrelated keys of the file, written back unchanged

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], adapter: str) -> "GiftConfig":
        kind = config.get("adapter_type", ADAPTER_TYPE)
        if kind != ADAPTER_TYPE:
            raise AdapterFormatError(f"{adapter}: adapter_type is {kind!r}, expected {ADAPTER_TYPE!r}")
        _refuse_unsupported(config, adapter)
        r = get_field(config, "r", int, adapter=adapter)
        if r <= 0:
            raise AdapterFormatError(f"{adapter}: config key 'r' must be positive, got {r}")
        targets = get_field(config, "target_modules", (list, str), adapter=adapter)
        if isinstance(targets, str):
            raise UnsupportedAdapterError(
                f"{adapter}: GIFT needs target_modules as a list of module types, not the regex {targets!r}"
            )
        scaling = get_field(config, "scaling", float, adapter=adapter)
        if scaling != 1.0:
            raise UnsupportedAdapterError(f"{adapter}: GIFT has no scaling; 'scaling' must be 1.0, got {scaling}")
        return cls(
            r=r,
            target_modules=_check_targets(targets, adapter),
            share_projections=get_field(config, "share_projections", bool, False, adapter),
            scaling=scaling,
            extra={k: v for k, v in config.items() if k not in _OWN_KEYS},
        )

    def theta_keys(self) -> list[str]:
        """The keys of the stored Θ = (φ, ψ): one per target, or the single `shared` one."""
        return [SHARED_KEY] if self.share_projections else list(self.target_modules)

    def theta_key(self, target: str) -> str:
        """The Θ that serves the layers `target` matches."""
        return SHARED_KEY if self.share_projections else target

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra, "adapter_type": ADAPTER_TYPE, "r": self.r, "target_modules": list(self.target_modules),
            "share_projections": self.share_projections, "scaling": self.scaling,
        }


def _refuse_unsupported(config: Mapping[str, Any], adapter: str) -> None:
    for key, (harmless, what) in _UNSUPPORTED.items():
        if config.get(key) not in harmless:
            raise UnsupportedAdapterError(f"{adapter}: {what} is not supported")
    block = config.get("gift_parameters")
    if block is not None and block not in _SIMPLE_BLOCKS:
        raise UnsupportedAdapterError(
            f"{adapter}: only the linear GIFT (gift_parameters simple_block with identity) is supported, got {block!r}"
        )


def _check_targets(targets: list[Any], adapter: str) -> list[str]:
    """Module types or dotted suffixes, none repeated, and no layer claimed by two of them."""
    if not targets:
        raise AdapterFormatError(f"{adapter}: target_modules is empty")
    for target in targets:
        if not isinstance(target, str) or not _TARGET.match(target):
            raise AdapterFormatError(
                f"{adapter}: target_modules entry {target!r} must be a module type such as 'q_proj' "
                "(or a dotted suffix such as 'attn.c_proj')"
            )
    for i, first in enumerate(targets):
        for second in targets[i + 1:]:
            if first == second or first.endswith("." + second) or second.endswith("." + first):
                raise AdapterFormatError(
                    f"{adapter}: target_modules entries {first!r} and {second!r} would both claim the same layers"
                )
    return list(targets)
