"""Tensor names of a hybrid adapter and their strict validation.

    sources.<k>.<module>.lora_A   [r_k, d_in]     source LoRA k (shared by all target tasks)
    sources.<k>.<module>.lora_B   [d_out, r_k]
    fusion.<t>.<module>.query     [d_a, d_out]    target task t's fusion parameters
    fusion.<t>.<module>.key       [d_a, d_out]
    fusion.<t>.<module>.value     [K, d_out]      per-source diagonal value gains
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..base import expect_shape
from ..errors import AdapterFormatError
from ..targets import matches_target
from .config import HybridConfig

_SOURCE_KEY = re.compile(r"^sources\.(?P<k>0|[1-9][0-9]*)\.(?P<module>.+)\.lora_(?P<which>[AB])$")
FUSION_PARAMS = ("query", "key", "value")


def source_key(k: int, module: str, which: str) -> str:
    """which: 'A' or 'B'."""
    return f"sources.{k}.{module}.lora_{which}"


def fusion_key(t: int, module: str, param: str) -> str:
    """param: 'query', 'key' or 'value'."""
    return f"fusion.{t}.{module}.{param}"


@dataclass(frozen=True)
class ModuleLayout:
    """The checked tensors of one adapted module."""

    d_in: int
    d_out: int
    sources: list[tuple[torch.Tensor, torch.Tensor]]  # per k: (A_k [r_k, d_in], B_k [d_out, r_k])
    # per t: (Q_t [d_a, d_out], K_t [d_a, d_out], V_t [K, d_out])
    fusion: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def parse_tensors(config: HybridConfig, tensors: Mapping[str, torch.Tensor], adapter: str) -> dict[str, ModuleLayout]:
    """Group the tensors by module; refuse missing, unexpected or misshapen tensors.

    Source 0 defines the module set and each module's (d_in, d_out); every other source and every target
    task must then hold exactly the same modules, so sources that adapt different modules are refused."""
    modules: dict[str, tuple[int, int]] = {}
    for key, tensor in tensors.items():
        match = _SOURCE_KEY.match(key)
        if match is None or match["k"] != "0" or match["which"] != "A":
            continue
        b = tensors.get(source_key(0, match["module"], "B"))
        if b is None:
            raise AdapterFormatError(f"{adapter}: tensor {source_key(0, match['module'], 'B')!r} is missing")
        if tensor.dim() != 2 or b.dim() != 2:
            raise AdapterFormatError(
                f"{adapter}: {key!r} and its lora_B must be 2-D, got {tuple(tensor.shape)} and {tuple(b.shape)}"
            )
        modules[match["module"]] = (tensor.shape[1], b.shape[0])
    if not modules:
        raise AdapterFormatError(f"{adapter}: the weights file holds no tensors 'sources.0.<module>.lora_A'")
    num_sources, d_a = config.num_sources, config.attention_dim
    expected: set[str] = set()
    layouts: dict[str, ModuleLayout] = {}
    for module in sorted(modules):
        if not matches_target(module, config.target_modules):
            raise AdapterFormatError(
                f"{adapter}: module {module!r} is not named by target_modules {config.target_modules!r}"
            )
        d_in, d_out = modules[module]
        sources = []
        for k, spec in enumerate(config.sources):
            a = expect_shape(tensors, source_key(k, module, "A"), (spec.r, d_in), adapter)
            b = expect_shape(tensors, source_key(k, module, "B"), (d_out, spec.r), adapter)
            sources.append((a, b))
        fusion = []
        for t in range(len(config.tasks)):
            q = expect_shape(tensors, fusion_key(t, module, "query"), (d_a, d_out), adapter)
            kk = expect_shape(tensors, fusion_key(t, module, "key"), (d_a, d_out), adapter)
            v = expect_shape(tensors, fusion_key(t, module, "value"), (num_sources, d_out), adapter)
            fusion.append((q, kk, v))
        expected.update(source_key(k, module, w) for k in range(num_sources) for w in "AB")
        expected.update(fusion_key(t, module, p) for t in range(len(config.tasks)) for p in FUSION_PARAMS)
        layouts[module] = ModuleLayout(d_in, d_out, sources, fusion)
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise AdapterFormatError(
            f"{adapter}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all): a hybrid adapter holds "
            f"{num_sources} source(s) and {len(config.tasks)} task(s), all over the same modules"
        )
    return layouts
