"""Training data: multi-task JSONL, held-out splits, tokenisation and padded batches.

One JSON object per line: `{"task": str, "prompt": str, "completion": str}` (other keys are ignored, blank
lines skipped). Every fault raises `DataError` naming the file and line.

Tokenisation matches serving exactly: the server encodes a request's prompt with `tokenizer(prompt)` (special
tokens included, e.g. a BOS) and then generates, so a training sequence is `tokenizer(prompt)` followed by
`tokenizer(completion, add_special_tokens=False)` and EOS. The loss is taken on the completion and the EOS.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.adapters.base import check_name
from loraplex.adapters.errors import AdapterFormatError

IGNORE_INDEX = -100


class DataError(ValueError):
    """The training or evaluation data is unusable (the message names the file and line)."""


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    completion: str
    source: str = ""  # "FILE line N", for messages


@dataclass(frozen=True)
class Encoded:
    """One tokenised example: ids = prompt ids + completion ids (+ EOS); the loss covers ids[prompt_len:]."""

    example: Example
    ids: tuple[int, ...]
    prompt_len: int

    @property
    def completion_ids(self) -> tuple[int, ...]:
        return self.ids[self.prompt_len:]


def read_examples(path: str | os.PathLike) -> list[Example]:
    """Parse a JSONL file; DataError naming the line on any bad line, or when it holds no example."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    out: list[Example] = []
    with path.open("r", encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                out.append(parse_line(line, f"{path.name} line {number}"))
    if not out:
        raise DataError(f"{str(path)!r} holds no examples (expected one JSON object per line)")
    return out


def parse_line(line: str, where: str) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with keys task, prompt, completion; got {type(row).__name__}")
    for key in ("task", "prompt", "completion"):
        if key not in row:
            raise DataError(f"{where}: key {key!r} is missing")
        if not isinstance(row[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}")
    try:
        check_name(row["task"], "task id")
    except AdapterFormatError as exc:
        raise DataError(f"{where}: {exc}") from None
    if not row["completion"]:
        raise DataError(f"{where}: 'completion' is empty; the loss is taken on the completion")
    return Example(row["task"], row["prompt"], row["completion"], where)


def task_list(examples: Iterable[Example]) -> list[str]:
    """Tasks in order of first appearance (this order is the task index of multi-task adapters)."""
    return list(dict.fromkeys(e.task for e in examples))


def split_held_out(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): per task, round(fraction · n) examples (at least 1 when fraction > 0 and n ≥ 2)
    drawn with `seed`; a task with a single example keeps it for training."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"--eval-fraction must be in [0, 1), got {fraction}")
    by_task: dict[str, list[Example]] = {}
    for e in examples:
        by_task.setdefault(e.task, []).append(e)
    rng = random.Random(seed)
    held: set[int] = set()
    for rows in by_task.values():
        n = len(rows)
        k = 0 if fraction == 0.0 or n < 2 else min(n - 1, max(1, round(fraction * n)))
        held.update(id(e) for e in rng.sample(rows, k))
    return [e for e in examples if id(e) not in held], [e for e in examples if id(e) in held]


def encode(examples: Sequence[Example], tokenizer, max_length: int) -> tuple[list[Encoded], list[Example]]:
    """(encoded, too long): examples whose prompt + completion + EOS exceed `max_length` tokens are returned
    apart, so that the caller can say so."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; completions could never end")
    encoded, too_long = [], []
    for e in examples:
        prompt_ids = list(tokenizer(e.prompt)["input_ids"])
        completion_ids = list(tokenizer(e.completion, add_special_tokens=False)["input_ids"]) + [eos]
        ids = prompt_ids + completion_ids
        if len(ids) > max_length:
            too_long.append(e)
            continue
        if not prompt_ids:
            raise DataError(f"{e.source}: the prompt encodes to no tokens and the tokenizer adds no BOS")
        encoded.append(Encoded(e, tuple(ids), len(prompt_ids)))
    return encoded, too_long


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] right-padded
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L] next-token targets aligned with input_ids (IGNORE_INDEX off the completion)

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(rows: Sequence[Encoded], pad_id: int) -> Batch:
    """Right-padded batch. labels[i, j] is the target of the logits at position j, i.e. ids[j + 1] when
    that token belongs to the completion (so no shift is needed later)."""
    width = max(len(r.ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.ids)
        input_ids[i, :n] = torch.tensor(r.ids)
        attention[i, :n] = 1
        labels[i, r.prompt_len - 1: n - 1] = torch.tensor(r.ids[r.prompt_len:])
    return Batch(input_ids, attention, labels)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return max(1, math.ceil(num_examples / batch_size))
