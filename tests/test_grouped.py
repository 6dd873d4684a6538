"""The stacked (grouped) path equals the per-group reference loop, and is the one taken in decode steps."""

from __future__ import annotations

import gc

import pytest
import torch
from families import FAMILY_TARGETS, TASKS, make_adapter, randomize
from tiny import prompts, tiny_model

from loraplex.adapters import AdaptedModel, BatchContext, adapter_class
from loraplex.adapters import grouped
from loraplex.adapters.grouped import PaddedRows
from loraplex.adapters.kernels import cpu as cpu_kernel


@pytest.fixture(autouse=True, params=["torch", "c"])
def grouped_path(request):
    """Every test on both CPU paths of the stacked groups: the torch path (runs of bmm) and the C kernel."""
    if request.param == "c" and cpu_kernel._library() is None:
        pytest.skip("no C compiler to build the kernel")
    cpu_kernel.enable(request.param == "c")
    yield request.param
    cpu_kernel.enable(True)


def stacked_equals_loop(adapted: AdaptedModel, plan: list, seed: int = 6) -> BatchContext:
    """One decode step of `plan` through the stacked path and through the per-group loop: equal logits;
    returns the stacked step's context."""
    ids = torch.stack(prompts([1] * len(plan), seed=seed))  # one token per sequence, as in decode
    results = {}
    for stacked in (False, True):
        adapted.stacked = stacked
        with torch.no_grad(), adapted.batch(plan, 1) as ctx:
            results[stacked] = adapted.model(ids).logits
    assert ctx.stacked is not None
    assert (results[True] - results[False]).abs().max() <= 1e-5
    return ctx


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stacked_decode_step_equals_the_reference_loop(arch, tmp_path):
    adapted = AdaptedModel(tiny_model(arch))
    bound = [adapted.bind(make_adapter(f, adapted, arch, f"{f}{i}", tmp_path, seed=i))
             for i, f in enumerate(["lora", "lora", "gift", "mtl_lora", "r_lora", "lora"])]
    plan = [(b, t % len(TASKS) if b.adapter.multi_task else 0) for b in bound for t in range(2)] + [(None, 0)]
    ctx = stacked_equals_loop(adapted, plan, seed=4)
    # stacked groups are only the low-rank families; R-LoRA stays on the loop
    assert [g.adapter.adapter.adapter_type for g in ctx.groups] == ["r_lora"]


def test_equal_consecutive_groups_are_served_in_place(tmp_path):
    """Decode rows grouped in equal runs (the engine's order) take the block path: views of the rows, no
    gather or scatter; it equals the per-group reference loop."""
    adapted = AdaptedModel(tiny_model("llama"))
    bound = [adapted.bind(make_adapter("lora", adapted, "llama", f"l{i}", tmp_path, seed=i)) for i in range(3)]
    ctx = stacked_equals_loop(adapted, [(b, 0) for b in bound for _ in range(2)] + [(None, 0)], seed=5)
    assert [run.plan.block_start for run in ctx.stacked.runs] == [0]


def test_prompts_are_stacked_only_as_blocks_and_training_uses_the_loop(tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    a, b, c = (adapted.bind(make_adapter("lora", adapted, "llama", n, tmp_path)) for n in "abc")
    pool = adapted.factor_pool
    with torch.no_grad():
        # equal prompts of adapters in consecutive slots: one block, viewed in place
        ctx = BatchContext.build([(a, 0), (b, 0)], 64, pool=pool)
        assert not ctx.groups and [(r.lo, r.hi, r.plan.block_start) for r in ctx.stacked.runs] == [(0, 2, 0)]
        # prompts of unequal lengths would need a padded copy: the loop serves them
        ctx = BatchContext.build([(a, 0), (b, 0)], [64, 40], pool=pool)
        assert ctx.stacked is None and [g.adapter for g in ctx.groups] == [a, b]
        # a prefill step: a lone prompt runs on the loop, the decode rows beside it are stacked
        ctx = BatchContext.build([(a, 0), (b, 0), (c, 0)], [1, 1, 20], pool=pool)
        assert [g.adapter for g in ctx.groups] == [c] and [(r.lo, r.hi) for r in ctx.stacked.runs] == [(0, 2)]
        # an adapter's decode rows and its prompt are separate groups, each part stacked
        ctx = BatchContext.build([(a, 0), (b, 0), (a, 0), (b, 0)], [1, 1, 20, 20], pool=pool)
        assert not ctx.groups and [(r.lo, r.hi, r.plan.block_start) for r in ctx.stacked.runs] == [(0, 2, 0), (0, 2, 2)]
        # a short prompt beside its adapter's decode row: never in the decode rows' run (one slot twice)
        ctx = BatchContext.build([(a, 0), (b, 0), (a, 0)], [1, 1, 5], pool=pool)
        assert [(g.adapter, g.num_rows) for g in ctx.groups] == [(a, 5)] and [r.plan.groups for r in ctx.stacked.runs] == [2]
    assert BatchContext.build([(a, 0), (b, 0)], 1, pool=pool).stacked is None  # grad enabled


def test_a_block_of_prompts_equals_the_reference_loop(tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    bound = [adapted.bind(make_adapter(f, adapted, "llama", f"{f}{i}", tmp_path, seed=i))
             for i, f in enumerate(["lora", "gift", "mtl_lora"])]
    plan = [(b, 1 if b.adapter.multi_task else 0) for b in bound]
    ids = torch.stack(prompts([20] * len(plan), seed=3))  # [3, 20]: prompts longer than MAX_GROUP_ROWS
    results = {}
    for stacked in (False, True):
        adapted.stacked = stacked
        with torch.no_grad(), adapted.batch(plan, ids.shape[1]) as ctx:
            results[stacked] = adapted.model(ids).logits
    assert not ctx.groups and ctx.stacked.runs[0].plan.block_start == 0
    assert (results[True] - results[False]).abs().max() <= 1e-5


def test_skewed_groups_keep_a_narrow_width_and_serve_the_rest_on_their_slot(tmp_path, monkeypatch):
    """A popular adapter among many singletons (zipf1000's decode steps): the run is not padded to the popular
    group's width; its rows past the width are served on its slot, consecutive (a slice) or scattered."""
    monkeypatch.setattr(grouped, "MAX_PADDED_ROWS", 16)
    adapted = AdaptedModel(tiny_model("llama"))
    bound = [lora(adapted, f"l{i}", i, FAMILY_TARGETS["llama"]) for i in range(6)]
    popular, scattered, singles = bound[0], bound[1], bound[2:]
    p, s, (a, b, c, d) = (popular, 0), (scattered, 0), [(x, 0) for x in singles]
    plan = [p] * 7 + [s, s, a, a, s, b, b, s, c, c, d, d, (None, 0)]
    ctx = stacked_equals_loop(adapted, plan)
    (run,) = ctx.stacked.runs
    assert (run.plan.groups, run.plan.width) == (6, 2)  # 6 groups x 7 rows would be 42 padded rows
    overflow = dict(run.overflow)
    assert overflow[pool_slot(adapted, popular)] == slice(2, 7)
    assert overflow[pool_slot(adapted, scattered)].tolist() == [11, 14]


def pool_slot(adapted: AdaptedModel, bound) -> int:
    return adapted.factor_pool.slot_of(bound, 0)


def test_padded_rows_layout():
    plan = PaddedRows.build([torch.tensor([4, 0]), torch.tensor([2]), torch.tensor([1, 3, 5])], "cpu")
    assert (plan.groups, plan.width) == (3, 3)
    assert plan.gather.tolist() == [4, 0, 0, 2, 0, 0, 1, 3, 5]
    assert plan.valid.tolist() == [0, 1, 3, 6, 7, 8]
    assert plan.rows.tolist() == [4, 0, 2, 1, 3, 5]
    assert plan.block_start is None  # unequal groups: gathered into the padded layout
    assert PaddedRows.build([torch.tensor([2, 3]), torch.tensor([4, 5])], "cpu").block_start == 2
    assert PaddedRows.build([torch.tensor([2, 3]), torch.tensor([5, 6])], "cpu").block_start is None  # a gap


# ---------------------------------------------------------------- the factor pool
def lora(adapted: AdaptedModel, name: str, seed: int, targets: list[str], rank: int = 4):
    adapter = adapter_class("lora").create(name, adapted.specs, target_modules=targets, rank=rank, seed=seed)
    randomize(adapter, seed + 100)
    return adapted.bind(adapter)


def test_pool_slots_outlive_batch_compositions():
    """A composition change writes only the newcomers' factors; the rest is read where it already lies."""
    adapted = AdaptedModel(tiny_model("llama"))
    a, b, c = (lora(adapted, n, i, FAMILY_TARGETS["llama"]) for i, n in enumerate("abc"))
    pool = adapted.factor_pool
    stacked_equals_loop(adapted, [(a, 0), (b, 0)])
    name = "model.layers.0.self_attn.q_proj"
    before = {n: pool.factors(n)[0][:2].clone() for n in adapted.specs if pool.factors(n) is not None}
    writes = []
    original = pool._write
    pool._write = lambda slot, bound, task: (writes.append(bound.adapter.name), original(slot, bound, task))
    ctx = stacked_equals_loop(adapted, [(c, 0), (b, 0), (a, 0)])
    assert writes == ["c"] and [(r.lo, r.hi) for r in ctx.stacked.runs] == [(0, 3)]
    stacked_equals_loop(adapted, [(b, 0), (c, 0)])
    assert writes == ["c"]
    assert all(torch.equal(pool.factors(n)[0][:2], t) for n, t in before.items()) and name in before


def test_freed_adapters_give_their_slot_back_and_reuse_is_exact():
    """Slots of unloaded adapters are reused; a newcomer on fewer modules, or of higher rank, leaves nothing of
    the slot's previous owner; gaps between slots split the step into runs."""
    adapted = AdaptedModel(tiny_model("llama"))
    pool = adapted.factor_pool
    bound = [lora(adapted, f"l{i}", i, FAMILY_TARGETS["llama"]) for i in range(5)]
    stacked_equals_loop(adapted, [(b, 0) for b in bound])
    assert [pool.slot_of(b, 0) for b in bound] == [0, 1, 2, 3, 4]
    ctx = stacked_equals_loop(adapted, [(bound[4], 0), (bound[0], 0), (bound[1], 0)])
    assert [(r.lo, r.hi) for r in ctx.stacked.runs] == [(0, 2), (4, 5)]  # two unused slots split the step
    ctx = stacked_equals_loop(adapted, [(bound[2], 0), (bound[0], 0)])
    assert [(r.lo, r.hi) for r in ctx.stacked.runs] == [(0, 3)]  # one is read for nothing

    del bound[1]  # now l0, l2, l3, l4 in slots 0, 2, 3, 4
    gc.collect()
    narrow = lora(adapted, "narrow", 7, ["q_proj"], rank=8)  # fewer modules, higher rank, into slot 1
    ctx = stacked_equals_loop(adapted, [(narrow, 0), (bound[0], 0), (bound[1], 0)])
    assert pool.slot_of(narrow, 0) == 1 and [(r.lo, r.hi) for r in ctx.stacked.runs] == [(0, 3)]
    assert len(pool) == 5

    del bound, narrow, ctx
    gc.collect()
    other = [lora(adapted, f"m{i}", 10 + i, ["v_proj"]) for i in range(2)]
    stacked_equals_loop(adapted, [(b, 0) for b in other])
    assert [pool.slot_of(b, 0) for b in other] == [0, 1] and len(pool) == 2


def test_engine_order_puts_decode_rows_in_slot_order():
    adapted = AdaptedModel(tiny_model("llama"))
    a, b = (lora(adapted, n, i, FAMILY_TARGETS["llama"]) for i, n in enumerate("ab"))
    stacked_equals_loop(adapted, [(b, 0), (a, 0)])
    assert adapted.stack_order(b, 0) < adapted.stack_order(a, 0) < adapted.stack_order(None, 0)


def test_pool_growth_and_reserve_keep_every_slot_exact():
    adapted = AdaptedModel(tiny_model("llama"))
    pool = adapted.factor_pool
    first = [lora(adapted, f"l{i}", i, FAMILY_TARGETS["llama"]) for i in range(8)]
    stacked_equals_loop(adapted, [(b, 0) for b in first])
    module = "model.layers.1.mlp.down_proj"
    assert pool.factors(module)[0].shape[0] == 8
    # more adapters than slots, one on a module none had before, one of higher rank: the pool grows
    more = [lora(adapted, "k", 20, ["k_proj"]), lora(adapted, "wide", 21, FAMILY_TARGETS["llama"], rank=8)]
    stacked_equals_loop(adapted, [(b, 0) for b in first + more])
    assert pool.factors(module)[0].shape[:2] == (16, 8)
    pool.reserve(40)
    stacked_equals_loop(adapted, [(b, 0) for b in more + first[::-1]])
    assert pool.factors(module)[0].shape[0] == 40
