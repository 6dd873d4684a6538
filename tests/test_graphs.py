"""CUDA graphs of decode steps (server/forward/graphs.py).

Off the GPU, the padded, slot-indexed step that a graph replays runs eagerly (`DecodeGraphs(capture=False)`), so
CI checks its padding rows, its masks over a fixed extent and its adapters served by pool slot. On a GPU (marked
gpu) the graphs themselves: replayed steps give the tokens of eager steps, also after the factor pool grows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from families import make_adapter, randomize
from test_engine import FakeManager
from tokenizer import build_tokenizer, lm

from loraplex.adapters import AdaptedModel, adapter_class, load_adapter
from loraplex.server.engine import Engine, EngineConfig
from loraplex.server.forward import graphs
from loraplex.server.forward.graphs import DecodeGraphs, length_bucket, row_bucket
from loraplex.server.request import SamplingParams

WAIT = 30.0
# base rows, a LoRA, three tasks of one MTL-LoRA, a LoRATRF adapter (no single low-rank
# delta: its steps run eagerly), and a
# LoRA of rank 8 on modules the others leave alone (new tensors in the factor pool when it first runs)
REQUESTS = [("", "the model"), ("lo1", "café 日本"), ("alpha", "ok ok a b"), ("beta", "query answer rank"),
            ("", "b"), ("lo1", "token batch rank"), ("gamma", "end"), ("wide", "the task"), ("tf", "rank a")]
LENGTHS = [12, 3, 9, 5, 7, 12, 10, 11, 2]  # sequences leave at different steps: n shrinks through the row buckets


def wide_lora(adapted: AdaptedModel, tmp) -> object:
    adapter = adapter_class("lora").create("wide", adapted.specs, target_modules=["k_proj", "gate_proj"], rank=8,
                                           seed=5)
    randomize(adapter, 105)
    adapter.save(tmp / "wide")
    return load_adapter(tmp / "wide")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("graphs")
    adapted = AdaptedModel(lm("llama", peak=8.0))
    adapters = {
        "lo1": make_adapter("lora", adapted, "llama", "lo1", tmp, seed=1),
        "mt": make_adapter("mtl_lora", adapted, "llama", "mt", tmp, seed=3),
        "tf": make_adapter("loratrf", adapted, "llama", "tf", tmp, seed=4),
        "wide": wide_lora(adapted, tmp),
    }
    return SimpleNamespace(tok=build_tokenizer(), adapters=adapters)


def new_engine(world, adapted: AdaptedModel, **config) -> Engine:
    config.setdefault("max_seq_len", 64)
    config.setdefault("max_slots", 16)
    return Engine(adapted, world.tok, FakeManager(adapted, world.adapters), EngineConfig(**config))


def alone(world, adapted: AdaptedModel, requests, lengths) -> list[list[int]]:
    with new_engine(world, adapted, cuda_graphs=False) as eng:
        return [eng.generate(t, p, SamplingParams(max_new_tokens=n, ignore_eos=True), timeout=WAIT).token_ids
                for (t, p), n in zip(requests, lengths)]


def together(eng: Engine, requests, lengths) -> list[list[int]]:
    handles = [eng.submit(t, p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for (t, p), n in
               zip(requests, lengths)]
    return [h.result(WAIT).token_ids for h in handles]


def test_buckets_hold_every_batch_within_the_cache():
    for slots in (1, 7, 64, 100):
        for n in range(1, slots + 1):
            assert n <= row_bucket(n, slots) <= slots
    assert [row_bucket(n, 64) for n in (1, 3, 5, 8, 9, 17, 64)] == [1, 4, 8, 8, 16, 24, 64]
    assert [length_bucket(n, 300) for n in (1, 256, 257, 299)] == [256, 256, 300, 300]


def test_the_step_a_graph_replays_gives_each_request_its_tokens_alone(world, monkeypatch):
    """Padding rows, masks over a fixed extent (8 positions a bucket here, so they cover short and long
    sequences), adapters by factor-pool slot: a mixed batch equals every request alone. Steps with the LoRATRF
    adapter's rows run eagerly."""
    monkeypatch.setattr(graphs, "LENGTH_BUCKET", 8)
    adapted = AdaptedModel(lm("llama", peak=8.0))
    want = alone(world, adapted, REQUESTS, LENGTHS)
    eng = new_engine(world, adapted)
    eng.graphs = DecodeGraphs(eng.forward, eng.cache, adapted, capture=False)
    calls = []
    run = eng.graphs.run
    monkeypatch.setattr(eng.graphs, "run", lambda *a: calls.append((len(a[0]), max(a[1]), "tf" in running(eng)))
                        or run(*a))
    with eng:
        got = together(eng, REQUESTS, LENGTHS)
    assert got == want
    assert calls and not any(filtered for _, _, filtered in calls)  # the LoRATRF rows' steps stayed eager
    assert any(row_bucket(n, 16) > n for n, _, _ in calls)  # some steps ran with padding rows
    assert len({length_bucket(p + 1, 64) for _, p, _ in calls}) > 1  # over several extents


def running(eng: Engine) -> set[str]:
    return {seq.adapter for seq in eng._running}


def test_rows_the_graphs_cannot_serve_are_named(world):
    adapted = AdaptedModel(lm("llama", peak=8.0))
    eng = new_engine(world, adapted)
    graphs_ = DecodeGraphs(eng.forward, eng.cache, adapted, capture=False)
    manager = FakeManager(adapted, world.adapters)
    assert graphs_.adapter_slot(None, 0) == -1  # the base model
    assert graphs_.adapter_slot(manager.bound["tf"], 0) is None  # LoRATRF: no single low-rank delta
    first = graphs_.adapter_slot(manager.bound["lo1"], 0)
    assert graphs_.adapter_slot(manager.bound["lo1"], 0) == first >= 0
    tasks = {graphs_.adapter_slot(manager.bound["mt"], t) for t in range(3)}
    assert len(tasks) == 3 and first not in tasks  # one slot per task of a multi-task adapter


# ---- on CUDA (marked gpu; skipped where torch sees no GPU, as in CI) ----
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_replayed_steps_equal_eager_steps_also_after_the_pool_grows(world):
    """In float32 (bfloat16 matmuls round by batch size: docs/design.md §12). The first batch captures graphs; the
    second brings an adapter on modules the pool had no tensors for, which must drop and recapture them."""
    adapted = AdaptedModel(lm("llama", peak=8.0).cuda())
    want = alone(world, adapted, REQUESTS, LENGTHS)
    keep = [i for i, (task, _) in enumerate(REQUESTS) if task != "wide"]
    first, first_lengths = [REQUESTS[i] for i in keep], [LENGTHS[i] for i in keep]
    with new_engine(world, adapted) as eng:
        assert eng.graphs is not None
        got_first = together(eng, first, first_lengths)
        captured, version = eng.graphs.captures, adapted.factor_pool.version
        got = together(eng, REQUESTS, LENGTHS)
        assert eng.graphs.enabled and captured > 0
        assert adapted.factor_pool.version > version and eng.graphs.captures > captured
    assert got_first == [want[i] for i in keep]
    assert got == want
