"""BatchContext grouping: rows are grouped by (adapter, task); rows with no adapter are in no group."""

from __future__ import annotations

import pytest
import torch
from families import make_adapter
from tiny import tiny_model

from loraplex.adapters import AdaptedModel, BatchContext


@pytest.fixture(scope="module")
def bound(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ctx")
    adapted = AdaptedModel(tiny_model("llama"))
    return {
        "a": adapted.bind(make_adapter("lora", adapted, "llama", "a", tmp)),
        "m": adapted.bind(make_adapter("mtl_lora", adapted, "llama", "m", tmp)),
    }


def rows_of(group) -> list[int]:
    rows = group.rows
    return list(range(rows.start, rows.stop)) if isinstance(rows, slice) else rows.tolist()


def test_padded_layout_groups_by_adapter_and_task(bound):
    a, m = bound["a"], bound["m"]
    ctx = BatchContext.build([(a, 0), (None, 0), (m, 1), (a, 0), (m, 2)], rows_per_sequence=3)
    assert ctx.num_rows == 15
    groups = {(g.adapter.adapter.name, g.task): rows_of(g) for g in ctx.groups}
    assert groups == {("a", 0): [0, 1, 2, 9, 10, 11], ("m", 1): [6, 7, 8], ("m", 2): [12, 13, 14]}


def test_adjacent_sequences_collapse_to_one_slice(bound):
    a = bound["a"]
    ctx = BatchContext.build([(a, 0), (a, 0), (None, 0)], rows_per_sequence=[2, 5, 4])
    (group,) = ctx.groups
    assert group.rows == slice(0, 7) and group.num_rows == 7 and ctx.num_rows == 11


def test_base_only_batch_has_no_groups(bound):
    ctx = BatchContext.build([(None, 0)] * 3, rows_per_sequence=1)
    assert ctx.groups == () and ctx.num_rows == 3


def test_mismatched_lengths_are_refused(bound):
    with pytest.raises(ValueError):
        BatchContext.build([(bound["a"], 0)], rows_per_sequence=[1, 2])


def test_activations_must_match_the_context(bound, tmp_path):
    adapted = AdaptedModel(tiny_model("llama"))
    a = adapted.bind(make_adapter("lora", adapted, "llama", "x", tmp_path))
    with pytest.raises(RuntimeError, match="rows"), adapted.batch([(a, 0)], 5):
        adapted.model(torch.zeros(1, 4, dtype=torch.long))
