"""Held-out evaluation per task: mean token loss on the completion, and exact match of the greedy completion."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

from loraplex.adapters import AdaptedModel, Adapter

from .data import IGNORE_INDEX, Encoded, collate
from .generate import greedy_generate


@dataclass
class TaskEval:
    task: str
    adapter: str
    examples: int
    loss: float  # mean cross-entropy per completion token (EOS included)
    exact_match: float  # fraction of greedy completions equal to the reference text
    samples: list[dict[str, str]]  # a few (prompt, expected, generated) for the report

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(adapted: AdaptedModel, tokenizer, served: Mapping[str, tuple[Adapter, int]], rows: Sequence[Encoded],
             batch_size: int = 64, max_new_tokens: int = 0, samples: int = 3) -> dict[str, TaskEval]:
    """Evaluate every held-out row through the adapter and task index that serve its task (`served`).

    max_new_tokens 0: each row may generate its reference length + 4 tokens (EOS ends it earlier)."""
    bound = {id(a): adapted.bind(a) for a, _ in served.values()}  # dropout off: serving behaviour
    assignments = [(bound[id(served[r.example.task][0])], served[r.example.task][1]) for r in rows]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss_sum: dict[str, float] = {}
    token_count: dict[str, int] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = collate(chunk, pad_id).to(adapted.device)
        with adapted.batch(assignments[start:start + batch_size], rows_per_sequence=batch.input_ids.shape[1]):
            logits = adapted.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        token_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch.labels.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="none").view(batch.labels.shape)
        for r, total, count in zip(chunk, token_loss.sum(1).tolist(), (batch.labels != IGNORE_INDEX).sum(1).tolist()):
            loss_sum[r.example.task] = loss_sum.get(r.example.task, 0.0) + total
            token_count[r.example.task] = token_count.get(r.example.task, 0) + count
    eos = {tokenizer.eos_token_id}
    limits = [max_new_tokens or len(r.completion_ids) + 4 for r in rows]
    generated = greedy_generate(adapted, [r.ids[: r.prompt_len] for r in rows], limits, eos, assignments,
                                pad_id=pad_id, batch_size=batch_size)
    results: dict[str, TaskEval] = {}
    for r, ids in zip(rows, generated):
        task = r.example.task
        text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        res = results.get(task)
        if res is None:
            res = results[task] = TaskEval(task, served[task][0].name, 0, 0.0, 0.0, [])
        res.examples += 1
        res.exact_match += text == r.example.completion
        if len(res.samples) < samples:
            res.samples.append({"prompt": r.example.prompt, "expected": r.example.completion, "generated": text})
    for task, res in results.items():
        res.exact_match /= max(1, res.examples)
        res.loss = loss_sum[task] / max(1, token_count[task])
    return results


def format_table(results: Mapping[str, TaskEval]) -> str:
    """A plain-text table, one line per task."""
    width = max([4] + [len(t) for t in results])
    lines = [f"{'task':<{width}}  {'adapter':<16} {'n':>5} {'loss':>8} {'exact':>7}"]
    for task, r in results.items():
        lines.append(f"{task:<{width}}  {r.adapter:<16} {r.examples:>5} {r.loss:>8.4f} {r.exact_match:>7.1%}")
    return "\n".join(lines)
