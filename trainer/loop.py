"""The training loop: one or more adapters trained together over one frozen base model.

A job is a list of *slots*, one per adapter being trained. Every step takes a batch from each slot that
still has steps to run and puts all rows into one forward pass, each row through its own (adapter, task)
(`AdaptedModel.batch`). The loss is the sum over slots of each slot's mean token loss, so every adapter
receives exactly the gradient of its own batch, and each slot has its own optimiser, schedule and gradient
clipping: training K single-task adapters together is the same as training them one after the other
(only faster, because the base model's matmuls are shared).

Multi-process (`accelerate launch`): the adapters' trainable tensors are the parameters of one module
that `Accelerator.prepare` wraps (DDP syncs their gradients); every process builds the same batch plan
from the seed and takes its share of each slot's rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from loraplex.adapters import AdaptedModel, Adapter

from .data import IGNORE_INDEX, Encoded, collate, steps_per_epoch


@dataclass
class Slot:
    """One adapter in training."""

    adapter: Adapter  # on the training device; its trainable tensors are nn.Parameters
    trainable: list[str]  # names of the tensors that train
    dropout: float  # the family's training dropout (BoundAdapter.dropout)
    rows: list[tuple[Encoded, int]]  # (example, task index in the adapter)
    total_steps: int
    lr: float
    batch_size: int  # rows of this slot per step (over all processes)
    losses: list[float] = field(default_factory=list)  # mean token loss of every step this slot ran

    @property
    def name(self) -> str:
        return self.adapter.name

    def parameters(self) -> list[nn.Parameter]:
        return [self.adapter.tensors[k] for k in self.trainable]


def to_training(adapter: Adapter, trainable: Sequence[str], device: torch.device) -> Adapter:
    """A copy of `adapter` on `device` in float32 whose `trainable` tensors are nn.Parameters (the family
    rebuilds itself around them, so that `bind` reads the parameters each step)."""
    missing = sorted(set(trainable) - set(adapter.tensors))
    if missing:
        raise KeyError(f"{adapter.name}: no tensor {missing[0]!r}")
    chosen = set(trainable)
    tensors: dict[str, torch.Tensor] = {}
    for key, t in adapter.tensors.items():
        t = t.detach().to(device=device, dtype=torch.float32).clone()
        tensors[key] = nn.Parameter(t) if key in chosen else t
    return type(adapter).from_files(adapter.name, adapter.config_dict(), tensors)


def planned_steps(num_rows: int, batch_size: int, epochs: float, max_steps: int) -> int:
    """max_steps when > 0, else ceil(epochs · batches per epoch)."""
    if max_steps > 0:
        return int(max_steps)
    return max(1, math.ceil(epochs * steps_per_epoch(num_rows, batch_size)))


class AdapterParameters(nn.Module):
    """The trainable tensors of every slot as one module, whose forward is the training loss."""

    def __init__(self, slots: Sequence[Slot], adapted: AdaptedModel, pad_id: int) -> None:
        super().__init__()
        self.params = nn.ParameterList([p for slot in slots for p in slot.parameters()])
        # plain attributes: the base model must not become a submodule (DDP would wrap and broadcast it)
        self.__dict__["slots"] = list(slots)
        self.__dict__["adapted"] = adapted
        self.pad_id = pad_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                slot_ids: list[int], task_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Σ_slots mean token loss, per-slot mean loss [S] (detached), per-slot token count [S])."""
        adapted = self.adapted
        bound = {}
        for s in sorted(set(slot_ids)):
            slot = self.slots[s]
            b = slot.adapter.bind(adapted.specs, adapted.device, adapted.dtype)  # differentiable
            b.dropout = slot.dropout
            bound[s] = b
        assignments = [(bound[s], t) for s, t in zip(slot_ids, task_ids)]
        with adapted.batch(assignments, rows_per_sequence=input_ids.shape[1]):
            logits = adapted.model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, L, V]
        token_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)  # [B, L]
        row_loss = token_loss.sum(1)  # [B]
        row_tokens = (labels != IGNORE_INDEX).sum(1)  # [B]
        owner = torch.tensor(slot_ids, device=labels.device)
        num_slots = len(self.slots)
        slot_loss = torch.zeros(num_slots, device=labels.device).index_add(0, owner, row_loss)
        slot_tokens = torch.zeros(num_slots, device=labels.device).index_add(0, owner, row_tokens.float())
        per_slot = slot_loss / slot_tokens.clamp(min=1)
        return per_slot.sum(), per_slot.detach(), slot_tokens


def _lr_lambda(kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress  # linear
    return factor


class _Plan:
    """Which rows each slot trains on at each of its steps: a fresh seeded permutation per epoch."""

    def __init__(self, num_rows: int, batch_size: int, seed: int) -> None:
        self.n, self.bs, self.seed = num_rows, batch_size, seed
        self.per_epoch = steps_per_epoch(num_rows, batch_size)
        self._epoch, self._perm = -1, torch.arange(0)

    def indices(self, step: int) -> list[int]:
        epoch, b = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm[b * self.bs:(b + 1) * self.bs].tolist()


def run_job(slots: Sequence[Slot], adapted: AdaptedModel, accelerator, *, pad_id: int,
            weight_decay: float, scheduler: str, warmup_steps: int, max_grad_norm: float, seed: int,
            progress: bool = True, desc: str = "train") -> dict[str, float]:
    """Train every slot for its `total_steps`; returns throughput figures. Slot losses land in slot.losses."""
    from tqdm.auto import tqdm

    module = AdapterParameters(slots, adapted, pad_id)
    wrapped = accelerator.prepare(module)
    optimizers, schedulers = [], []
    for slot in slots:
        opt = torch.optim.AdamW(slot.parameters(), lr=slot.lr, weight_decay=weight_decay)
        optimizers.append(opt)
        schedulers.append(torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(scheduler, warmup_steps, slot.total_steps)))
    plans = [_Plan(len(slot.rows), slot.batch_size, seed * 7919 + i) for i, slot in enumerate(slots)]
    rank, world = accelerator.process_index, accelerator.num_processes
    total = max(slot.total_steps for slot in slots)
    bar = tqdm(total=total, desc=desc, unit="step", disable=not (progress and accelerator.is_local_main_process),
               dynamic_ncols=True)
    tokens_seen, start, ema = 0, time.perf_counter(), None
    device = accelerator.device
    for step in range(total):
        active = [i for i, slot in enumerate(slots) if step < slot.total_steps]
        rows: list[Encoded] = []
        slot_ids: list[int] = []
        task_ids: list[int] = []
        for i in active:
            for j in plans[i].indices(step)[rank::world]:
                example, task = slots[i].rows[j]
                rows.append(example)
                slot_ids.append(i)
                task_ids.append(task)
        weight = 1.0
        if not rows:  # this process has no share this step (tiny data, many processes): a weightless row
            i = active[0]
            example, task = slots[i].rows[plans[i].indices(step)[0]]
            rows, slot_ids, task_ids, weight = [example], [i], [task], 0.0
        for i in active:
            optimizers[i].zero_grad(set_to_none=True)
        batch = collate(rows, pad_id).to(device)
        loss, per_slot, _ = wrapped(batch.input_ids, batch.attention_mask, batch.labels, slot_ids, task_ids)
        accelerator.backward(loss * weight)
        tokens_seen += int(batch.attention_mask.sum()) if weight else 0
        for i in active:
            if max_grad_norm > 0:
                accelerator.clip_grad_norm_(slots[i].parameters(), max_grad_norm)
            optimizers[i].step()
            schedulers[i].step()
            slots[i].losses.append(float(per_slot[i]))
        mean = sum(slots[i].losses[-1] for i in active) / len(active)
        ema = mean if ema is None else 0.9 * ema + 0.1 * mean
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{ema:.4f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}", refresh=False)
        bar.update(1)
    bar.close()
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - start
    return {"steps": total, "seconds": seconds, "tokens_per_second": tokens_seen / max(seconds, 1e-9)}
