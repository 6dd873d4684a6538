"""The stacked (grouped) path equals the per-group reference loop, and is the one taken in decode steps."""

from __future__ import annotations

import pytest
import torch
from families import TASKS, make_adapter
from tiny import prompts, tiny_model

from loraplex.adapters import AdaptedModel, BatchContext
from loraplex.adapters.grouped import PaddedRows


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stacked_decode_step_equals_the_reference_loop(arch, tmp_path):
    adapted = AdaptedModel(tiny_model(arch))
    bound = [adapted.bind(make_adapter(f, adapted, arch, f"{f}{i}", tmp_path, seed=i))
             for i, f in enumerate(["lora", "lora", "gift", "mtl_lora", "r_lora", "lora"])]
    plan = [(b, t % len(TASKS) if b.adapter.multi_task else 0) for b in bound for t in range(2)] + [(None, 0)]
    ids = torch.stack(prompts([1] * len(plan), seed=4))  # one token per sequence, as in decode
    results = {}
    for stacked in (False, True):
        adapted.stacked = stacked
        with torch.no_grad(), adapted.batch(plan, 1) as ctx:
            results[stacked] = adapted.model(ids).logits
        assert (ctx.stacked is not None) == stacked
    assert (results[True] - results[False]).abs().max() <= 1e-5
    # stacked groups are only the low-rank families; R-LoRA stays on the loop
    assert [g.adapter.adapter.adapter_type for g in ctx.groups] == ["r_lora"]


def test_equal_consecutive_groups_are_served_in_place(tmp_path):
    """Decode rows grouped in equal runs (the engine's order) take the block path: views of the rows, no
    gather or scatter; it equals the per-group reference loop."""
    adapted = AdaptedModel(tiny_model("llama"))
    bound = [adapted.bind(make_adapter("lora", adapted, "llama", f"l{i}", tmp_path, seed=i)) for i in range(3)]
    plan = [(b, 0) for b in bound for _ in range(2)] + [(None, 0)]
    ids = torch.stack(prompts([1] * len(plan), seed=5))
    results = {}
    for stacked in (False, True):
        adapted.stacked = stacked
        with torch.no_grad(), adapted.batch(plan, 1) as ctx:
            results[stacked] = adapted.model(ids).logits
    assert ctx.stacked is not None and ctx.stacked.plan.block_start == 0
    assert (results[True] - results[False]).abs().max() <= 1e-5


def test_large_groups_and_training_use_the_loop(tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    a, b = (adapted.bind(make_adapter("lora", adapted, "llama", n, tmp_path)) for n in "ab")
    stacks_for = adapted._stacks_for
    with torch.no_grad():
        assert BatchContext.build([(a, 0), (b, 0)], 64, stacks_for=stacks_for).stacked is None  # prefill-sized
        assert BatchContext.build([(a, 0), (b, 0)], 1, stacks_for=stacks_for).stacked is not None
    assert BatchContext.build([(a, 0), (b, 0)], 1, stacks_for=stacks_for).stacked is None  # grad enabled


def test_padded_rows_layout():
    plan = PaddedRows.build([torch.tensor([4, 0]), torch.tensor([2]), torch.tensor([1, 3, 5])], "cpu")
    assert (plan.groups, plan.width) == (3, 3)
    assert plan.gather.tolist() == [4, 0, 0, 2, 0, 0, 1, 3, 5]
    assert plan.valid.tolist() == [0, 1, 3, 6, 7, 8]
    assert plan.rows.tolist() == [4, 0, 2, 1, 3, 5]
    assert plan.block_start is None  # unequal groups: gathered into the padded layout
    assert PaddedRows.build([torch.tensor([2, 3]), torch.tensor([4, 5])], "cpu").block_start == 2
    assert PaddedRows.build([torch.tensor([2, 3]), torch.tensor([5, 6])], "cpu").block_start is None  # a gap
