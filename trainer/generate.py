"""Greedy generation over an `AdaptedModel`, each sequence through its own (bound adapter, task).

Used by the trainer's held-out evaluation (exact match) and by scripts/train_default_model.py. Prompts are
left-padded with explicit position ids, so a padded sequence computes what it would alone; the model's own
KV cache carries the decode steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraplex.adapters import AdaptedModel, BoundAdapter

Assignment = tuple[BoundAdapter | None, int]


@torch.no_grad()
def greedy_generate(adapted: AdaptedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                    eos_ids: set[int] | frozenset[int], assignments: Sequence[Assignment] | None = None,
                    pad_id: int = 0, batch_size: int = 64) -> list[list[int]]:
    """Generated ids per prompt (EOS excluded), at most `max_new_tokens` each (an int or one per prompt)."""
    n = len(prompts)
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    assignments = list(assignments) if assignments is not None else [(None, 0)] * n
    if len(limits) != n or len(assignments) != n:
        raise ValueError("prompts, max_new_tokens and assignments must have the same length")
    order = sorted(range(n), key=lambda i: len(prompts[i]))  # similar lengths together: less padding
    out: list[list[int]] = [[] for _ in range(n)]
    for start in range(0, n, batch_size):
        chosen = order[start:start + batch_size]
        generated = _generate_batch(adapted, [prompts[i] for i in chosen], [limits[i] for i in chosen],
                                    eos_ids, [assignments[i] for i in chosen], pad_id)
        for i, ids in zip(chosen, generated):
            out[i] = ids
    return out


def _generate_batch(adapted: AdaptedModel, prompts: list[Sequence[int]], limits: list[int], eos_ids,
                    assignments: list[Assignment], pad_id: int) -> list[list[int]]:
    device = adapted.device
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [b, width]
    outputs: list[list[int]] = [[] for _ in range(b)]
    done = [limit <= 0 for limit in limits]
    past = None
    step_ids, step_pos = ids, positions
    for _ in range(max(limits, default=0)):
        if all(done):
            break
        with adapted.batch(assignments, rows_per_sequence=step_ids.shape[1]):
            result = adapted.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                                   past_key_values=past, use_cache=True)
        past = result.past_key_values
        nxt = result.logits[:, -1].argmax(-1)  # [b]
        for i, token in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if token in eos_ids:
                done[i] = True
                continue
            outputs[i].append(token)
            done[i] = len(outputs[i]) >= limits[i]
        step_ids = nxt[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
    return outputs
