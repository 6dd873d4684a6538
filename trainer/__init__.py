"""loraplex.trainer: train task adapters of every family on multi-task JSONL (`loraplex train`).

    from loraplex.trainer import TrainConfig, train
    result = train(TrainConfig(method="mtl_lora", data="train.jsonl", out="adapters"))
    result.evaluation["sort"].exact_match
"""

from .config import METHODS, TrainConfig
from .data import DataError, Example, read_examples
from .evaluate import TaskEval, evaluate, format_table
from .generate import greedy_generate
from .run import TrainResult, train

__all__ = ["METHODS", "DataError", "Example", "TaskEval", "TrainConfig", "TrainResult", "evaluate", "format_table",
           "greedy_generate", "read_examples", "train"]
