"""`train(config)`: load the base model and the data, train the method's adapters, save, evaluate, report."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraplex.adapters import AdaptedModel, Adapter

from .config import DEFAULT_LR, DEFAULT_LR_EMBEDDED, MULTI_TASK_METHODS, SINGLE_TASK_METHODS, TrainConfig
from .data import DataError, Encoded, Example, encode, read_examples, split_held_out, task_list
from .evaluate import TaskEval, evaluate, format_table
from .loop import Slot, planned_steps, run_job, to_training
from .methods import create_adapter, load_sources, resolve_targets, trainable_tensors, training_dropout

log = logging.getLogger("loraplex.trainer")
REPORT_FILE = "train_report.json"
HYBRID_SOURCES_DIR = ".hybrid-sources"  # hidden: `loraplex serve --adapter-dir OUT` skips it


@dataclass
class TrainResult:
    adapters: dict[str, Adapter]  # name -> the trained adapter (on the training device)
    paths: dict[str, Path]  # name -> saved directory
    tasks: list[str]
    evaluation: dict[str, TaskEval]
    losses: dict[str, list[float]]  # adapter name -> mean token loss per step (stage-1 sources included)
    seconds: float  # the whole call: loading, training, saving, evaluation
    stages: list[dict]  # per training job: desc, steps, seconds, tokens_per_second
    adapted: AdaptedModel = field(repr=False)
    tokenizer: object = field(repr=False)

    def served(self) -> dict[str, tuple[Adapter, int]]:
        """task -> (adapter, task index) as a server resolves the task id."""
        out = {}
        for adapter in self.adapters.values():
            for task in (adapter.tasks if adapter.multi_task else [adapter.name]):
                out[task] = (adapter, adapter.task_index(task))
        return out


def make_accelerator(device: str):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    cpu = device == "cpu" or not torch.cuda.is_available()
    _forget_another_device(cpu)
    return Accelerator(cpu=cpu, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _forget_another_device(cpu: bool) -> None:
    """Accelerate keeps one state per process and refuses an Accelerator on another device than the first one's
    ("AcceleratorState has already been initialized"); a process that trains on the GPU and then on the CPU (or
    the other way round) starts that state afresh."""
    from accelerate.state import AcceleratorState, PartialState

    if PartialState._shared_state and (PartialState().device.type == "cpu") != cpu:
        AcceleratorState._reset_state(reset_partial_state=True)


def load_model(cfg: TrainConfig, device: torch.device):
    """(model, tokenizer, base id written into reports): --base-model, or the embedded default."""
    from loraplex.server.loader import load_base

    if cfg.base_model:
        base = cfg.base_model
    else:
        from loraplex.default_model import default_model_path

        base = str(default_model_path())
    model, tokenizer = load_base(base, device=str(device), dtype=cfg.dtype)
    return model, tokenizer, base


def train(cfg: TrainConfig, *, examples: Sequence[Example] | None = None,
          eval_examples: Sequence[Example] | None = None, model=None, tokenizer=None) -> TrainResult:
    """Train `cfg.method` on `cfg.data` (or `examples`) and write the adapters under `cfg.out`.

    `model`/`tokenizer` (optional) replace loading `cfg.base_model`; the model is wrapped in place."""
    from accelerate.utils import set_seed

    cfg = dataclasses.replace(cfg)  # defaults resolved below must not leak into the caller's config
    cfg.check()
    start = time.perf_counter()
    set_seed(cfg.seed)
    accelerator = make_accelerator(cfg.device)
    main = accelerator.is_main_process
    base_id = cfg.base_model or "(given model)"
    if model is None:
        model, tokenizer, base_id = load_model(cfg, accelerator.device)
    elif tokenizer is None:
        raise ValueError("a model was given without its tokenizer")
    if cfg.lr is None:
        cfg.lr = DEFAULT_LR_EMBEDDED if _is_embedded(base_id) else DEFAULT_LR
    model = model.to(accelerator.device).eval()
    adapted = AdaptedModel(model)

    train_rows, held_out, tasks = _prepare_data(cfg, examples, eval_examples, tokenizer, model)
    targets = resolve_targets(cfg.target_modules, adapted.specs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = Path(cfg.out)
    losses: dict[str, list[float]] = {}
    stages: list[dict] = []
    job = dict(pad_id=pad_id, weight_decay=cfg.weight_decay, scheduler=cfg.scheduler,
               warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
               progress=cfg.progress)
    device = accelerator.device

    def slot(adapter: Adapter, rows: list[tuple[Encoded, int]], lr: float, epochs: float, max_steps: int,
             unfreeze: bool = False) -> Slot:
        # --batch-size counts sequences per task: a multi-task adapter's step mixes batch_size x tasks
        batch_size = cfg.batch_size * (len(adapter.tasks) if adapter.multi_task else 1)
        trained = to_training(adapter, trainable_tensors(adapter, unfreeze), device)
        return Slot(trained, trainable_tensors(trained, unfreeze), training_dropout(trained, cfg), rows,
                    planned_steps(len(rows), batch_size, epochs, max_steps), lr, batch_size)

    by_task = {t: [r for r in train_rows if r.example.task == t] for t in tasks}
    if cfg.method in SINGLE_TASK_METHODS or (cfg.method == "hybrid" and cfg.sources is None):
        kind = "lora" if cfg.method == "hybrid" else cfg.method
        slots = [slot(create_adapter(kind, t, adapted.specs, cfg, [t], targets, seed=cfg.seed * 1000 + k),
                      [(r, 0) for r in by_task[t]], cfg.lr, cfg.epochs, cfg.max_steps)
                 for k, t in enumerate(tasks)]
        desc = f"{kind} x{len(slots)}" + (" (hybrid stage 1)" if cfg.method == "hybrid" else "")
        stages.append({"desc": desc, **run_job(slots, adapted, accelerator, desc=desc, **job)})
        losses.update({s.name: s.losses for s in slots})
        trained = [s.adapter for s in slots]
    if cfg.method in MULTI_TASK_METHODS:
        name = cfg.name or cfg.method
        lr, epochs, max_steps = cfg.lr, cfg.epochs, cfg.max_steps
        sources = None
        if cfg.method == "hybrid":
            if cfg.sources is not None:
                sources = load_sources(cfg.sources)
                targets = sorted(sources[0].factors)  # the sources decide the modules
            else:
                sources = trained
                if main:
                    for adapter in sources:
                        adapter.save(out / HYBRID_SOURCES_DIR / adapter.name)
            lr = cfg.fusion_lr or cfg.lr
            epochs = cfg.fusion_epochs or cfg.epochs
            max_steps = cfg.fusion_max_steps if cfg.fusion_max_steps is not None else cfg.max_steps
        adapter = create_adapter(cfg.method, name, adapted.specs, cfg, tasks, targets, seed=cfg.seed, sources=sources)
        rows = [(r, tasks.index(r.example.task)) for r in train_rows]
        multi = slot(adapter, rows, lr, epochs, max_steps, unfreeze=cfg.unfreeze_sources)
        desc = cfg.method + (" (fusion)" if cfg.method == "hybrid" else "")
        stages.append({"desc": desc, **run_job([multi], adapted, accelerator, desc=desc, **job)})
        losses[multi.name] = multi.losses
        trained = [multi.adapter]

    adapters = {a.name: a for a in trained}
    paths = {name: out / name for name in adapters}
    evaluation: dict[str, TaskEval] = {}
    if main:
        for name, adapter in adapters.items():
            adapter.save(paths[name])
        result = TrainResult(adapters, paths, tasks, {}, losses, 0.0, stages, adapted, tokenizer)
        if held_out:
            evaluation = evaluate(adapted, tokenizer, result.served(), held_out, cfg.eval_batch_size,
                                  cfg.eval_max_new_tokens)
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - start
    result = TrainResult(adapters, paths, tasks, evaluation, losses, seconds, stages, adapted, tokenizer)
    if main:
        _write_report(out, cfg, base_id, result)
    return result


def _is_embedded(base_id: str) -> bool:
    from loraplex.default_model import DEFAULT_MODEL_DIR

    try:
        return Path(base_id).resolve() == DEFAULT_MODEL_DIR
    except OSError:
        return False


def _prepare_data(cfg: TrainConfig, examples, eval_examples, tokenizer, model):
    """(training rows, held-out rows, tasks in first-appearance order), with clear errors."""
    if examples is None:
        if not cfg.data:
            raise DataError("no training data: give --data TRAIN.jsonl")
        examples = read_examples(cfg.data)
    examples = list(examples)
    if not examples:
        raise DataError("no training examples")
    if eval_examples is None and cfg.eval_data:
        eval_examples = read_examples(cfg.eval_data)
    if eval_examples is not None:
        train_examples, held = examples, list(eval_examples)
    else:
        train_examples, held = split_held_out(examples, cfg.eval_fraction, cfg.seed)
    tasks = task_list(train_examples)
    unknown = sorted({e.task for e in held} - set(tasks))
    if unknown:
        raise DataError(f"held-out data names task(s) {unknown} that have no training examples")
    limit = cfg.max_length or min(2048, int(getattr(model.config, "max_position_embeddings", 2048) or 2048))
    train_rows, too_long = encode(train_examples, tokenizer, limit)
    held_rows, held_too_long = encode(held, tokenizer, limit)
    dropped = too_long + held_too_long
    if dropped:
        log.warning("%d example(s) longer than %d tokens were left out (first: %s)", len(dropped), limit, dropped[0].source)
    empty = [t for t in tasks if not any(r.example.task == t for r in train_rows)]
    if empty:
        raise DataError(f"task(s) {empty} have no training example within --max-length {limit}")
    return train_rows, held_rows, tasks


def _write_report(out: Path, cfg: TrainConfig, base_id: str, result: TrainResult) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "method": cfg.method, "base_model": base_id, "tasks": result.tasks,
        "adapters": {name: str(path) for name, path in result.paths.items()},
        "seconds": round(result.seconds, 2),
        "training": [{k: round(v, 2) if isinstance(v, float) else v for k, v in stage.items()} for stage in result.stages],
        "final_train_loss": {name: (sum(v[-10:]) / len(v[-10:]) if v else None) for name, v in result.losses.items()},
        "evaluation": {task: ev.to_dict() for task, ev in result.evaluation.items()},
        "config": cfg.to_dict(),
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


__all__ = ["TrainResult", "format_table", "train"]
