"""What each method trains: which adapters, created with which options, which tensors train, which dropout.

| method     | adapters                          | trains                         | training dropout            |
|------------|-----------------------------------|--------------------------------|-----------------------------|
| `lora`     | one per task, named after it      | A, B                           | on x (p = --dropout)        |
| `gift`     | one per task                      | Θ = (φ, ψ), shared over layers | none (the paper uses 0)     |
| `loratrf`  | one per task                      | A, B, filter F, c              | on x                        |
| `mtl_lora` | one over all tasks                | A, Λ_t, B_i, ω_t               | on x                        |
| `r_lora`   | one over all tasks                | A, B_i, router (not the offset)| multi-head, on x Aᵀ per head|
| `hybrid`   | stage 1: one LoRA per task; stage 2: one fusion over all tasks | stage 2: the fusion (Q_t, K_t, V_t), sources frozen unless --unfreeze-sources | stage 1 like lora; stage 2 on the scores |

Every adapter starts from its family's `create` (the paper's initialisation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from loraplex.adapters import Adapter, adapter_class, load_adapter
from loraplex.adapters.hybrid import HybridAdapter
from loraplex.adapters.linear import LinearSpec
from loraplex.adapters.lora import LoraAdapter
from loraplex.adapters.targets import module_type

from .config import TrainConfig


def resolve_targets(target_modules: Sequence[str] | str, specs: Mapping[str, LinearSpec]) -> list[str] | str:
    """"all-linear" -> every module type of the base's adapted linear layers (sorted); a comma-separated
    string -> a list; a list stays a list."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return sorted({module_type(name) for name in specs})
        return [t.strip() for t in target_modules.split(",") if t.strip()]
    return list(target_modules)


def create_adapter(method: str, name: str, specs: Mapping[str, LinearSpec], cfg: TrainConfig, tasks: list[str],
                   targets: list[str] | str, seed: int, sources: Sequence[LoraAdapter] | None = None) -> Adapter:
    """A freshly initialised adapter of `method` (for hybrid: the stage-2 fusion over `sources`)."""
    common = dict(target_modules=targets, rank=cfg.rank, seed=seed)
    if method == "lora":
        adapter = LoraAdapter.create(name, specs, lora_alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora, **common)
        adapter.config.raw["lora_dropout"] = cfg.train_dropout  # PEFT's key; informative when serving
        adapter.config.raw["task_type"] = "CAUSAL_LM"
        return adapter
    cls = adapter_class(method)
    if method == "mtl_lora":
        return cls.create(name, specs, tasks=tasks, lora_alpha=cfg.lora_alpha, num_b=cfg.num_b,
                          temperature=cfg.temperature, lambda_format=cfg.lambda_format, dropout=cfg.train_dropout,
                          **common)
    if method == "r_lora":
        return cls.create(name, specs, tasks=tasks, num_heads=cfg.heads, lora_alpha=cfg.lora_alpha,
                          dropout=cfg.train_dropout, init_gamma=cfg.init_gamma, offset=cfg.offset, **common)
    if method == "gift":
        if isinstance(targets, str):
            raise ValueError("gift needs --target-modules as module types (e.g. q_proj,v_proj), not a regex")
        return cls.create(name, specs, share_projections=cfg.share_projections, **common)
    if method == "loratrf":
        return cls.create(name, specs, lora_alpha=cfg.lora_alpha, dropout=cfg.train_dropout,
                          filter_bias_init=cfg.filter_bias_init, **common)
    if method == "hybrid":
        return HybridAdapter.create(name, specs, tasks=tasks, sources=list(sources or []),
                                    attention_dim=cfg.attention_dim, temperature=cfg.fusion_temperature,
                                    fusion_dropout=cfg.fusion_dropout, **common)
    raise ValueError(f"unknown method {method!r}")


def trainable_tensors(adapter: Adapter, unfreeze_sources: bool = False) -> list[str]:
    """The tensor names a method trains: everything, except R-LoRA's fixed init offset and (by default)
    the frozen source LoRAs of a hybrid fusion."""
    names = sorted(adapter.tensors)
    if adapter.adapter_type == "r_lora":
        return [n for n in names if not n.endswith((".offset_A", ".offset_B"))]
    if adapter.adapter_type == "hybrid" and not unfreeze_sources:
        return [n for n in names if n.startswith("fusion.")]
    return names


def training_dropout(adapter: Adapter, cfg: TrainConfig) -> float:
    """The family's own training dropout, as stored in its config where the family stores it."""
    kind = adapter.adapter_type
    if kind in ("mtl_lora", "r_lora", "loratrf"):
        return float(adapter.config.dropout)
    if kind == "hybrid":
        return float(adapter.config.fusion_dropout)
    if kind == "gift":
        return 0.0
    return cfg.train_dropout


def load_sources(directory: str | Path) -> list[LoraAdapter]:
    """Every LoRA adapter directly under `directory` (sorted by name; hidden entries skipped)."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"--sources {str(root)!r} is not a directory")
    sources = []
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or not (child / "adapter_config.json").is_file():
            continue
        adapter = load_adapter(child)
        if not isinstance(adapter, LoraAdapter):
            raise ValueError(f"--sources: {child.name!r} is a {adapter.adapter_type} adapter; hybrid fuses LoRA adapters")
        sources.append(adapter)
    if not sources:
        raise ValueError(f"--sources {str(root)!r} holds no adapter directories")
    return sources
