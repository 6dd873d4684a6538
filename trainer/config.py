"""Every knob of `loraplex train`, with its default. The CLI flags map one to one onto these fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

METHODS = ("lora", "mtl_lora", "r_lora", "gift", "loratrf", "hybrid")
SINGLE_TASK_METHODS = ("lora", "gift", "loratrf")  # one adapter per task, named after the task
MULTI_TASK_METHODS = ("mtl_lora", "r_lora", "hybrid")  # one adapter over all tasks
SCHEDULERS = ("linear", "cosine", "constant")
# learning rates when --lr is not given: the usual LoRA rate for real models, and a larger one for the
# embedded default model (0.7 M parameters; its adapters learn the demo tasks in ~100 steps at 5e-3)
DEFAULT_LR = 2e-4
DEFAULT_LR_EMBEDDED = 5e-3

# the family's own training dropout when --dropout is not given (adapter-methods.md: LoRA 0.05 on x,
# MTL-LoRA 0.05, R-LoRA 0.1 (multi-head), LoRATRF 0.05 (interim spec), GIFT none; hybrid: its stage-1
# source LoRAs, the fusion's score dropout being --fusion-dropout)
DEFAULT_DROPOUT = {"lora": 0.05, "mtl_lora": 0.05, "r_lora": 0.1, "gift": 0.0, "loratrf": 0.05, "hybrid": 0.05}


@dataclass
class TrainConfig:
    method: str
    data: str | None = None  # training JSONL (the CLI requires it; the API may pass examples instead)
    out: str = "adapters"
    base_model: str | None = None  # None: the embedded default model
    name: str | None = None  # adapter name of multi-task methods (default: the method name)
    # data and evaluation
    eval_data: str | None = None
    eval_fraction: float = 0.1
    eval_batch_size: int = 64
    eval_max_new_tokens: int = 0  # 0: the longest held-out completion + 4
    max_length: int = 0  # 0: the model's max_position_embeddings (capped at 2048)
    # adapter shape
    rank: int = 8
    alpha: float | None = None  # None: 2 · rank
    target_modules: list[str] | str = "all-linear"
    dropout: float | None = None  # None: DEFAULT_DROPOUT[method]
    use_rslora: bool = False  # lora: s = alpha / sqrt(r)
    # optimisation
    lr: float | None = None  # None: DEFAULT_LR_EMBEDDED on the embedded default model, else DEFAULT_LR
    weight_decay: float = 0.0
    epochs: float = 3.0
    max_steps: int = 0  # > 0: train exactly this many steps per adapter (overrides epochs)
    batch_size: int = 16  # sequences per task per step (multi-task adapters: batch_size x tasks, mixed)
    scheduler: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # base model dtype; adapter weights always train in float32
    progress: bool = True
    # mtl_lora
    num_b: int = 3
    temperature: float = 0.1
    lambda_format: str = "full"
    # r_lora
    heads: int = 5
    init_gamma: float = 64.0
    offset: bool = True
    # gift
    share_projections: bool = False
    # loratrf
    filter_bias_init: float = 4.0
    # hybrid
    sources: str | None = None  # directory of trained LoRA source adapters (skips stage 1)
    attention_dim: int = 16
    fusion_temperature: float = 1.0
    fusion_dropout: float = 0.0  # AdapterFusion's dropout on the attention scores, training only
    fusion_lr: float | None = None  # None: lr
    fusion_epochs: float | None = None  # None: epochs
    fusion_max_steps: int | None = None  # None: max_steps
    unfreeze_sources: bool = False  # stage 2 also trains the source LoRAs (joint fine-tuning)
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """ValueError naming the flag on an impossible value."""
        problems = []
        if self.method not in METHODS:
            problems.append(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.rank <= 0:
            problems.append(f"--rank must be positive, got {self.rank}")
        if self.lr is not None and self.lr <= 0:
            problems.append(f"--lr must be positive, got {self.lr}")
        if self.batch_size <= 0 or self.eval_batch_size <= 0:
            problems.append("--batch-size and --eval-batch-size must be positive")
        if self.epochs <= 0 and self.max_steps <= 0:
            problems.append("give --epochs > 0 or --max-steps > 0")
        if self.max_steps < 0 or self.warmup_steps < 0:
            problems.append("--max-steps and --warmup-steps must not be negative")
        if not 0.0 <= self.eval_fraction < 1.0:
            problems.append(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            problems.append(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.fusion_dropout < 1.0:
            problems.append(f"--fusion-dropout must be in [0, 1), got {self.fusion_dropout}")
        if self.scheduler not in SCHEDULERS:
            problems.append(f"--scheduler must be one of {', '.join(SCHEDULERS)}")
        if self.max_grad_norm < 0:
            problems.append("--max-grad-norm must not be negative (0 turns clipping off)")
        if self.sources is not None and self.method != "hybrid":
            problems.append("--sources is only for --method hybrid")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    @property
    def train_dropout(self) -> float:
        return DEFAULT_DROPOUT[self.method] if self.dropout is None else float(self.dropout)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
