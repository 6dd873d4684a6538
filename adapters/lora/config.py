"""LoRA config: the PEFT `LoraConfig` fields that matter for serving, and a refusal for the rest."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..base import get_field
from ..errors import UnsupportedAdapterError
from ..targets import pattern_value

# PEFT features that change the forward pass and that we do not implement: refused, never ignored.
# key -> (value that is harmless, what to call it in the message)
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA (use_dora)"),
    "modules_to_save": (None, "modules_to_save (fully trained extra modules)"),
    "lora_bias": (False, "trainable LoRA bias (lora_bias)"),
    "layer_replication": (None, "layer_replication"),
    "use_qalora": (False, "QA-LoRA (use_qalora)"),
    "target_parameters": (None, "target_parameters (LoRA on raw parameters)"),
    "trainable_token_indices": (None, "trainable_token_indices"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens)"),
    "megatron_config": (None, "Megatron parallel layers (megatron_config)"),
    "arrow_config": (None, "Arrow routing (arrow_config)"),
    "use_bdlora": (False, "BD-LoRA (use_bdlora)"),
    "kasa_config": (None, "KaSA (kasa_config)"),
    "velora_config": (None, "VeLoRA (velora_config)"),
    "monteclora_config": (None, "MonteCLoRA (monteclora_config)"),
}


@dataclass
class LoraConfig:
    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    raw: dict[str, Any] = field(default_factory=dict)  # the file's own dict, written back unchanged

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], adapter: str) -> "LoraConfig":
        for key, (harmless, what) in _UNSUPPORTED.items():
            value = config.get(key, harmless)
            if value not in (harmless, None, False, [], {}):
                raise UnsupportedAdapterError(f"{adapter}: {what} is not supported")
        bias = config.get("bias", "none")
        if bias != "none":
            raise UnsupportedAdapterError(f"{adapter}: trainable bias (bias={bias!r}) is not supported; use bias='none'")
        r = get_field(config, "r", int, adapter=adapter)
        if r <= 0:
            raise UnsupportedAdapterError(f"{adapter}: r must be positive, got {r}")
        rank_pattern = get_field(config, "rank_pattern", dict, {}, adapter)
        alpha_pattern = get_field(config, "alpha_pattern", dict, {}, adapter)
        target = config.get("target_modules")
        if target is not None and not isinstance(target, (str, list)):
            raise UnsupportedAdapterError(f"{adapter}: target_modules must be a list or a regex string")
        return cls(
            r=r,
            lora_alpha=get_field(config, "lora_alpha", float, float(r), adapter),
            use_rslora=get_field(config, "use_rslora", bool, False, adapter),
            rank_pattern=dict(rank_pattern),
            alpha_pattern=dict(alpha_pattern),
            target_modules=target,
            fan_in_fan_out=get_field(config, "fan_in_fan_out", bool, False, adapter),
            raw=dict(config),
        )

    def rank_for(self, module: str) -> int:
        return int(pattern_value(self.rank_pattern, module, self.r))

    def scale_for(self, module: str) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA, per module after the patterns."""
        r = self.rank_for(module)
        alpha = float(pattern_value(self.alpha_pattern, module, self.lora_alpha))
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.raw)
        out.update(
            r=self.r, lora_alpha=self.lora_alpha, use_rslora=self.use_rslora, rank_pattern=self.rank_pattern,
            alpha_pattern=self.alpha_pattern, target_modules=self.target_modules, fan_in_fan_out=self.fan_in_fan_out,
        )
        out.setdefault("peft_type", "LORA")
        out.setdefault("bias", "none")
        return out
