"""loraplex.trainer: train task adapters of every family on multi-task JSONL (`loraplex train`).

    from loraplex.trainer import TrainConfig, train
    result = train(TrainConfig(method="mtl_lora", data="train.jsonl", out="adapters"))
    result.evaluation["sort"].exact_match

The names below load their module (and torch) on first use, so that `loraplex --help` and `loraplex health`,
which import the command-line module `loraplex.trainer.cli`, stay light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_HOME = {
    "METHODS": "config", "TrainConfig": "config", "DataError": "data", "Example": "data", "read_examples": "data",
    "TaskEval": "evaluate", "evaluate": "evaluate", "format_table": "evaluate", "greedy_generate": "generate",
    "TrainResult": "run", "train": "run",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOME[name]}", __name__), name)


__all__ = sorted(_HOME)
