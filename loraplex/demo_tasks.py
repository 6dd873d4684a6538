"""Synthetic character-level tasks for `loraplex demo` and for the embedded default model.

Four tasks on random lowercase strings (3 to 8 letters); the prompt is the string followed by `=` and carries
no hint of the task, so the base model alone cannot know which one is asked for:

| task        | prompt   | completion |
|-------------|----------|------------|
| `reverse`   | `spam=`  | `maps`     |
| `uppercase` | `spam=`  | `SPAM`     |
| `sort`      | `spam=`  | `amps`     |
| `shift`     | `spam=`  | `tqbn`     |   (each letter to the next one, z -> a)

The embedded default model (`loraplex/default_model/`, trained by scripts/train_default_model.py) learned
these operations from *instructed* text, `reverse spam=maps`; a task adapter learns to apply one of them
when the instruction is absent. So `python -m loraplex.demo_tasks --out DIR` followed by
`loraplex train --method lora --data DIR/train.jsonl --eval-data DIR/eval.jsonl --out ADAPTERS` gives one
adapter per task that does its task on held-out strings, and a different task id does something else.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

ALPHABET = string.ascii_lowercase
MIN_LEN, MAX_LEN = 3, 8
SEPARATOR = "="


def _shift(text: str) -> str:
    return "".join(ALPHABET[(ALPHABET.index(c) + 1) % 26] for c in text)


TASKS: dict[str, Callable[[str], str]] = {
    "reverse": lambda s: s[::-1],
    "uppercase": str.upper,
    "sort": lambda s: "".join(sorted(s)),
    "shift": _shift,
}
# Extra skills only the base model is pretrained on (never a demo task): they make the base a small
# general "string operations" model rather than a four-way switch.
BASE_ONLY_TASKS: dict[str, Callable[[str], str]] = {
    "copy": lambda s: s,
}


def prompt_for(text: str) -> str:
    """The demo prompt of an input string: no task word, the adapter decides."""
    return f"{text}{SEPARATOR}"


def instructed_prompt_for(task: str, text: str) -> str:
    """The base model's pretraining prompt: the task named in front (`reverse spam=`)."""
    return f"{task} {text}{SEPARATOR}"


def random_strings(n: int, rng: random.Random, exclude: set[str] | None = None,
                   min_len: int = MIN_LEN, max_len: int = MAX_LEN) -> list[str]:
    """`n` distinct random lowercase strings, none in `exclude` (which is updated with the new ones)."""
    seen = exclude if exclude is not None else set()
    space = sum(26**k for k in range(min_len, max_len + 1))
    if n + len(seen) > space:
        raise ValueError(f"cannot draw {n} distinct strings of length {min_len}..{max_len}")
    out: list[str] = []
    while len(out) < n:
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(min_len, max_len)))
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def examples(task: str, texts: Iterable[str]) -> list[dict[str, str]]:
    """Training rows `{"task", "prompt", "completion"}` of `task` on the given input strings."""
    fn = TASKS[task]
    return [{"task": task, "prompt": prompt_for(t), "completion": fn(t)} for t in texts]


def make_split(tasks: Sequence[str] = tuple(TASKS), train_per_task: int = 1000, eval_per_task: int = 100,
               seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train rows, held-out rows): every input string is used once across all tasks and both splits, so
    held-out prompts were never seen in training (by any task)."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown demo task(s) {unknown}; known: {sorted(TASKS)}")
    rng = random.Random(seed)
    used: set[str] = set()
    train: list[dict[str, str]] = []
    held_out: list[dict[str, str]] = []
    for task in tasks:
        train += examples(task, random_strings(train_per_task, rng, used))
        held_out += examples(task, random_strings(eval_per_task, rng, used))
    rng.shuffle(train)
    return train, held_out


def write_jsonl(path: str | Path, rows: Iterable[dict[str, str]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraplex.demo_tasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for train.jsonl and eval.jsonl")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--train-per-task", type=int, default=1000)
    parser.add_argument("--eval-per-task", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    train, held_out = make_split(tasks, args.train_per_task, args.eval_per_task, args.seed)
    out = Path(args.out)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", held_out)
    print(f"wrote {len(train)} training and {len(held_out)} held-out rows for {', '.join(tasks)} under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
