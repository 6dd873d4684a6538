"""The serving engine: continuous batching over adapters and tasks, streaming, sampling, limits, cancellation,
merge/batch switching. Models are tiny and peaky (scaled output head) so that greedy comparisons between
different batch compositions are token-exact."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from families import make_adapter
from tokenizer import build_tokenizer, lm

from loraplex.adapters import AdaptedModel, AdapterFormatError, UnknownTaskError
from loraplex.server import host_memory
from loraplex.server.engine import Engine, EngineConfig
from loraplex.server.request import (
    EngineStoppedError,
    FinishReason,
    InvalidRequestError,
    QueueFullError,
    SamplingParams,
    now,
)
from loraplex.server.tasks import TaskRoute, routes_of

WAIT = 30.0  # seconds: the bound on every wait in this file
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
REQUESTS = [  # (task id, prompt): base rows, two LoRAs, three tasks of one MTL-LoRA
    ("", "the model"), ("lo1", "café 日本"), ("alpha", "ok ok a b"), ("lo2", "the task"),
    ("mt/beta", "query answer rank"), ("", "b"), ("lo1", "token batch rank"), ("gamma", "end"),
]


class FakeLease:
    def __init__(self, manager: "FakeManager", bound) -> None:
        self.manager, self._bound = manager, bound

    @property
    def bound(self):
        assert self._bound is not None, "a released lease was used"
        return self._bound

    def release(self) -> None:
        if self._bound is not None:
            self._bound = None
            with self.manager.lock:
                self.manager.leased -= 1


class FakeManager:
    """The AdapterManager interface (resolve / acquire -> Lease | None) over adapters bound up front.
    `gate[name]` (an Event) holds an adapter "loading" until set; `broken` names adapters whose load fails."""

    def __init__(self, adapted, adapters) -> None:
        self.bound = {name: adapted.bind(a) for name, a in adapters.items()}
        self.routes = {tid: r for a in adapters.values() for tid, r in routes_of(a).items()}
        self.gate: dict[str, threading.Event] = {}
        self.broken: set[str] = set()
        self.pinned: set[str] = set()
        self.lock = threading.Lock()
        self.leased = 0
        self.acquires = 0

    def resolve(self, task_id: str) -> TaskRoute | None:
        if task_id == "":
            return None
        if task_id not in self.routes:
            raise UnknownTaskError(f"unknown task id {task_id!r}")
        return self.routes[task_id]

    def acquire(self, name: str):
        with self.lock:
            self.acquires += 1
        if name in self.broken:
            raise AdapterFormatError(f"adapter {name!r} could not be loaded: broken on purpose")
        gate = self.gate.get(name)
        if gate is not None and not gate.is_set():
            return None
        with self.lock:
            self.leased += 1
        return FakeLease(self, self.bound[name])

    def is_pinned(self, name: str) -> bool:
        return name in self.pinned


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    model = lm("llama", peak=8.0)
    adapted = AdaptedModel(model)
    adapters = {
        "lo1": make_adapter("lora", adapted, "llama", "lo1", tmp, seed=1),
        "lo2": make_adapter("lora", adapted, "llama", "lo2", tmp, seed=2),
        "mt": make_adapter("mtl_lora", adapted, "llama", "mt", tmp, seed=3),
    }
    return SimpleNamespace(tok=build_tokenizer(), model=model, adapted=adapted, adapters=adapters, tmp=tmp)


def engine(world, manager=None, **config) -> Engine:
    config.setdefault("max_seq_len", 64)
    config.setdefault("max_slots", 8)
    world.adapted.unmerge()
    manager = manager or FakeManager(world.adapted, world.adapters)
    return Engine(world.adapted, world.tok, manager, EngineConfig(**config))


def one_at_a_time(world, requests, params=GREEDY, **config) -> list:
    with engine(world, **config) as eng:
        return [eng.generate(t, p, params, timeout=WAIT) for t, p in requests]


@pytest.fixture(scope="module")
def sequential(world):
    return one_at_a_time(world, REQUESTS)


def hf_greedy(world, task_id: str, prompt: str, n: int) -> list[int]:
    """Reference: greedy decoding with HF's full forward (no cache) through the same adapter rows."""
    manager = FakeManager(world.adapted, world.adapters)
    route = manager.resolve(task_id)
    assignment = (None, 0) if route is None else (manager.bound[route.adapter], route.task_index)
    ids = world.tok(prompt)["input_ids"]
    out = []
    for _ in range(n):
        with torch.no_grad(), world.adapted.batch([assignment], rows_per_sequence=len(ids)):
            token = int(world.model(torch.tensor([ids])).logits[0, -1].argmax())
        ids, out = ids + [token], out + [token]
    return out


def test_engine_matches_hf_greedy(world, sequential):
    for i in (0, 1, 4):
        task, prompt = REQUESTS[i]
        assert sequential[i].token_ids == hf_greedy(world, task, prompt, GREEDY.max_new_tokens)


def test_concurrent_mixed_adapters_equal_one_at_a_time(world, sequential):
    manager = FakeManager(world.adapted, world.adapters)
    sizes = []
    observer = SimpleNamespace(step=lambda r: sizes.append(r.batch_size), request_finished=lambda r: None)
    with engine(world, manager, observer=observer) as eng:
        handles = [eng.submit(t, p, GREEDY) for t, p in REQUESTS]
        results = [h.result(WAIT) for h in handles]
    for got, want in zip(results, sequential):
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.finish_reason == FinishReason.LENGTH and got.generated_tokens == 12
    assert [r.adapter for r in results] == ["", "lo1", "mt", "lo2", "mt", "", "lo1", "mt"]
    assert max(sizes) == len(REQUESTS)  # they really shared forward passes
    assert manager.leased == 0


def test_requests_leaving_at_different_steps_keep_their_kv(world, sequential):
    """Early finishers free slots mid-batch; the sequences moved into them go on unchanged."""
    lengths = [3, 12, 5, 9, 2, 12, 7, 4]
    with engine(world) as eng:
        handles = [eng.submit(t, p, SamplingParams(max_new_tokens=n, ignore_eos=True))
                   for (t, p), n in zip(REQUESTS, lengths)]
        results = [h.result(WAIT) for h in handles]
    for got, want, n in zip(results, sequential, lengths):
        assert got.token_ids == want.token_ids[:n]


def test_streaming_concatenates_to_the_result(world):
    with engine(world) as eng:
        handle = eng.submit("lo2", "café 日本 the", SamplingParams(max_new_tokens=20, ignore_eos=True))
        deltas = list(handle.stream(timeout=WAIT))
        result = handle.result(WAIT)
    assert "".join(d.text for d in deltas) == result.text
    assert [t for d in deltas for t in d.token_ids] == result.token_ids
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason == FinishReason.LENGTH


def test_async_streaming(world):
    async def collect(eng):
        handle = eng.submit("alpha", "the model", SamplingParams(max_new_tokens=10, ignore_eos=True))
        deltas = [d async for d in handle.aiter()]
        return deltas, handle.result(WAIT)

    with engine(world) as eng:
        deltas, result = asyncio.run(asyncio.wait_for(collect(eng), WAIT))
    assert "".join(d.text for d in deltas) == result.text
    assert [t for d in deltas for t in d.token_ids] == result.token_ids
    assert deltas[-1].finish_reason == FinishReason.LENGTH


def test_seed_reproduces_whatever_the_batch(world):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, seed=1234, ignore_eos=True)
    with engine(world) as eng:
        alone = eng.generate("lo1", "the model", params, timeout=WAIT)
        others = [eng.submit(t, p, SamplingParams(max_new_tokens=12, temperature=0.8, ignore_eos=True))
                  for t, p in REQUESTS]
        crowded = eng.submit("lo1", "the model", params)
        again = crowded.result(WAIT)
        for h in others:
            h.result(WAIT)
        other_seed = eng.generate("lo1", "the model", SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50,
                                                                     seed=99, ignore_eos=True), timeout=WAIT)
    assert again.token_ids == alone.token_ids
    assert other_seed.token_ids != alone.token_ids


def test_stop_string_ends_the_request(world):
    with engine(world) as eng:
        full = eng.generate("lo1", "café 日本", SamplingParams(max_new_tokens=30, ignore_eos=True), timeout=WAIT)
        text = full.text
        start = next(i for i in range(4, len(text) - 3) if text[i:i + 3].strip() == text[i:i + 3])
        stop = text[start:start + 3]
        params = SamplingParams(max_new_tokens=30, ignore_eos=True, stop=["zzzz", stop])
        handle = eng.submit("lo1", "café 日本", params)
        deltas = list(handle.stream(timeout=WAIT))
        result = handle.result(WAIT)
    assert result.finish_reason == FinishReason.STOP
    assert result.text == text[:text.index(stop)]
    assert "".join(d.text for d in deltas) == result.text
    assert result.token_ids == full.token_ids[:len(result.token_ids)] and len(result.token_ids) < 30


def test_eos_ends_the_request_unless_ignored(world, sequential):
    tokens = sequential[3].token_ids
    eos = tokens[4]
    first = tokens.index(eos)
    with engine(world, eos_token_ids=[eos]) as eng:
        stopped = eng.generate(*REQUESTS[3], SamplingParams(max_new_tokens=12), timeout=WAIT)
        ignored = eng.generate(*REQUESTS[3], SamplingParams(max_new_tokens=12, ignore_eos=True), timeout=WAIT)
    assert stopped.finish_reason == FinishReason.EOS and stopped.token_ids == tokens[:first + 1]
    assert ignored.finish_reason == FinishReason.LENGTH and ignored.token_ids == tokens


def test_tokenizer_eos_is_the_default(world):
    with engine(world) as eng:
        assert eng.eos == {world.tok.eos_token_id}


def test_cancel_frees_the_slot_for_a_queued_request(world):
    manager = FakeManager(world.adapted, world.adapters)
    held = {"steps": 0}

    def on_step(record):  # cancel from the engine thread, two steps after the second request queued
        held["steps"] += "queued" in held
        if held["steps"] == 2:
            held["stats"] = held["engine"].stats()
            held["long"].cancel()

    observer = SimpleNamespace(step=on_step, request_finished=lambda r: None)
    with engine(world, manager, max_slots=1, max_seq_len=128, observer=observer) as eng:
        held["engine"] = eng
        held["long"] = long = eng.submit("lo1", "the model", SamplingParams(max_new_tokens=120, ignore_eos=True))
        held["queued"] = queued = eng.submit("lo2", "the task", GREEDY)
        cancelled = long.result(WAIT)
        done = queued.result(WAIT)
    assert held["stats"].queue_depth == 1 and held["stats"].slots_used == 1  # the only slot was taken
    assert cancelled.finish_reason == FinishReason.CANCELLED and cancelled.generated_tokens < 120
    assert done.finish_reason == FinishReason.LENGTH and done.generated_tokens == 12
    assert list(long.stream(timeout=WAIT))[-1].finish_reason == FinishReason.CANCELLED
    assert manager.leased == 0


def test_cancel_while_queued(world):
    manager = FakeManager(world.adapted, world.adapters)
    manager.gate["lo2"] = threading.Event()  # lo2 never finishes loading
    with engine(world, manager) as eng:
        handle = eng.submit("lo2", "the task", GREEDY)
        handle.cancel()
        result = handle.result(WAIT)
    assert result.finish_reason == FinishReason.CANCELLED and result.token_ids == []


def test_full_kv_cache_makes_requests_wait_not_fail(world, sequential):
    steps = []
    observer = SimpleNamespace(step=steps.append, request_finished=lambda r: None)
    with engine(world, max_slots=2, observer=observer) as eng:
        assert eng.cache.num_slots == 2
        handles = [eng.submit(t, p, GREEDY) for t, p in REQUESTS[:5]]
        results = [h.result(WAIT) for h in handles]
    assert [r.token_ids for r in results] == [r.token_ids for r in sequential[:5]]
    assert max(s.running for s in steps) == 2 and max(s.batch_size for s in steps) == 2
    assert max(s.queue_depth for s in steps) >= 1  # some waited for a slot


def test_queued_requests_wait_for_their_adapter_load(world, sequential):
    manager = FakeManager(world.adapted, world.adapters)
    manager.gate["lo1"] = threading.Event()
    with engine(world, manager) as eng:
        waiting = eng.submit(*REQUESTS[1], GREEDY)
        base = eng.submit(*REQUESTS[0], GREEDY)
        assert base.result(WAIT).token_ids == sequential[0].token_ids  # not held back by the cold adapter
        assert not waiting.done
        manager.gate["lo1"].set()
        assert waiting.result(WAIT).token_ids == sequential[1].token_ids


def test_a_starved_request_holds_back_only_the_requests_that_would_take_a_device_slot(world, sequential):
    manager = FakeManager(world.adapted, world.adapters)
    manager.gate["lo1"] = threading.Event()
    with engine(world, manager, adapter_wait_s=0.0) as eng:
        starved = eng.submit(*REQUESTS[1], GREEDY)
        base = eng.submit(*REQUESTS[0], GREEDY)
        cold = eng.submit(*REQUESTS[3], GREEDY)  # lo2 is not running: it would take a device slot
        assert base.result(WAIT).token_ids == sequential[0].token_ids  # the base model takes no device slot
        with pytest.raises(TimeoutError):
            cold.result(0.3)  # held back: lo1 has waited longer than adapter_wait_s
        manager.gate["lo1"].set()
        assert starved.result(WAIT).token_ids == sequential[1].token_ids
        assert cold.result(WAIT).token_ids == sequential[3].token_ids


def has_output(handle) -> bool:
    try:
        next(handle.stream(timeout=0))
    except TimeoutError:
        return False
    return True


@pytest.mark.parametrize("pinned", [set(), {"lo2"}])
def test_a_starved_request_drains_the_unpinned_running_adapter_with_the_fewest_rows(world, sequential, pinned):
    manager = FakeManager(world.adapted, world.adapters)
    manager.pinned = pinned
    drained, other = ("mt", "lo2") if pinned else ("lo2", "mt")  # a pinned adapter keeps its slot
    running, late, overlaps = {}, {}, []
    paused, resume = threading.Event(), threading.Event()

    def step(record) -> None:  # on the engine thread, after each step
        handles = running.get("lo2", []) + running.get("mt", [])
        if not paused.is_set() and len(handles) == 3 and all(has_output(h) for h in handles):
            paused.set()  # all three run: hold the engine while the test submits the rest
            resume.wait(WAIT)
        if drained in late and has_output(late[drained]) and not all(h.done for h in running[drained]):
            overlaps.append(record)  # the late request ran beside the adapter draining for lo1

    long = SamplingParams(max_new_tokens=40, ignore_eos=True)
    observer = SimpleNamespace(step=step, request_finished=lambda r: None)
    with engine(world, manager, adapter_wait_s=0.0, observer=observer) as eng:
        running["lo2"] = [eng.submit("lo2", "the task", long)]  # one row of lo2, two of mt
        running["mt"] = [eng.submit("alpha", "ok ok a b", long), eng.submit("gamma", "end", long)]
        assert paused.wait(WAIT)
        manager.gate["lo1"] = threading.Event()
        starved = eng.submit(*REQUESTS[1], GREEDY)
        late_index = {"lo2": 3, "mt": 4}  # REQUESTS[3] is lo2's, REQUESTS[4] mt's
        late.update({name: eng.submit(*REQUESTS[i], GREEDY) for name, i in late_index.items()})
        resume.set()
        assert late[other].result(WAIT).token_ids == sequential[late_index[other]].token_ids
        assert not any(h.done for h in running[drained])  # `other` took a request while `drained` drained
        for handle in running[drained]:
            handle.result(WAIT)
        manager.gate["lo1"].set()
        assert starved.result(WAIT).token_ids == sequential[1].token_ids
        assert late[drained].result(WAIT).token_ids == sequential[late_index[drained]].token_ids
    assert not overlaps


def test_failed_adapter_load_fails_only_its_request(world, sequential):
    manager = FakeManager(world.adapted, world.adapters)
    manager.broken.add("lo2")
    finished = []
    observer = SimpleNamespace(step=lambda r: None, request_finished=finished.append)
    with engine(world, manager, observer=observer) as eng:
        bad = eng.submit(*REQUESTS[3], GREEDY)
        good = eng.submit(*REQUESTS[1], GREEDY)
        with pytest.raises(AdapterFormatError, match="broken on purpose"):
            bad.result(WAIT)
        assert good.result(WAIT).token_ids == sequential[1].token_ids
    outcomes = {r.adapter: r.outcome for r in finished}
    assert outcomes == {"lo2": "error", "lo1": FinishReason.LENGTH}


def test_queue_is_bounded(world):
    manager = FakeManager(world.adapted, world.adapters)
    manager.gate["lo1"] = threading.Event()
    with engine(world, manager, max_queued_requests=2) as eng:
        handles = [eng.submit("lo1", "the model", GREEDY) for _ in range(2)]
        with pytest.raises(QueueFullError):
            eng.submit("lo1", "the model", GREEDY)
        assert eng.stats().queue_depth == 2
        manager.gate["lo1"].set()
        assert all(h.result(WAIT).generated_tokens == 12 for h in handles)
        assert eng.generate("", "ok", GREEDY, timeout=WAIT).generated_tokens == 12  # room again


@pytest.mark.parametrize("params,prompt,match", [
    (SamplingParams(temperature=-1.0), "ok", "temperature"),
    (SamplingParams(top_p=1.5), "ok", "top_p"),
    (SamplingParams(top_k=-2), "ok", "top_k"),
    (SamplingParams(max_new_tokens=64), "ok", "max_new_tokens"),  # above the limit (max_seq_len - 1)
    (SamplingParams(max_new_tokens=60), "the model the model the model", "max_new_tokens"),  # does not fit
    (SamplingParams(), "the model " * 40, "prompt"),  # longer than the limit
    (SamplingParams(), [5, 10_000], "prompt"),  # token id outside the vocabulary
    (SamplingParams(stop=[""]), "ok", "stop"),
])
def test_invalid_requests_are_refused_at_submit(world, params, prompt, match):
    with engine(world) as eng:
        with pytest.raises(InvalidRequestError, match=match):
            eng.submit("lo1", prompt, params)


def test_unknown_task_and_stopped_engine(world):
    eng = engine(world)
    with pytest.raises(UnknownTaskError):
        eng.submit("nope", "ok", GREEDY)
    with pytest.raises(EngineStoppedError):
        eng.submit("", "ok", GREEDY)  # not started
    eng.start()
    eng.stop()
    with pytest.raises(EngineStoppedError):
        eng.submit("", "ok", GREEDY)


def test_default_max_new_tokens_fits_the_context(world):
    with engine(world, default_max_new_tokens=1000) as eng:
        result = eng.generate("", [7] * 60, SamplingParams(ignore_eos=True), timeout=WAIT)
    assert result.generated_tokens == 4 and result.prompt_tokens == 60  # 64 positions in all


def test_token_id_prompt_equals_text_prompt(world, sequential):
    ids = world.tok(REQUESTS[2][1])["input_ids"]
    with engine(world) as eng:
        assert eng.generate(REQUESTS[2][0], ids, GREEDY, timeout=WAIT).token_ids == sequential[2].token_ids


def test_stop_with_grace_cancels_what_is_left(world):
    slow = SimpleNamespace(step=lambda r: time.sleep(0.02), request_finished=lambda r: None)
    eng = engine(world, max_seq_len=128, observer=slow)
    eng.start()
    handle = eng.submit("lo1", "the model", SamplingParams(max_new_tokens=120, ignore_eos=True))
    next(handle.stream(timeout=WAIT))
    eng.stop(grace=0.05)
    result = handle.result(WAIT)
    assert result.finish_reason == FinishReason.CANCELLED and result.generated_tokens < 120
    assert eng.stats().running == 0 and eng.stats().slots_used == 0


def test_stats_account_kv_bytes(world):
    with engine(world, max_slots=3) as eng:
        stats = eng.stats()
        assert stats.kv_bytes_total == eng.cache.nbytes == 3 * 64 * eng.cache.token_bytes
        assert stats.kv_bytes_used == 0 and stats.running == 0 and stats.slots_total == 3
    small = engine(world, max_slots=64, kv_cache_max_bytes=5 * 64 * eng.cache.token_bytes)
    assert small.cache.num_slots == 5


def test_observer_sees_requests_and_steps(world):
    steps, finished = [], []
    observer = SimpleNamespace(step=steps.append, request_finished=finished.append)
    with engine(world, observer=observer) as eng:
        eng.generate("alpha", "the model", GREEDY, timeout=WAIT)
    (record,) = finished
    assert record.adapter == "mt" and record.task_id == "alpha" and record.outcome == FinishReason.LENGTH
    assert record.generated_tokens == 12 and record.prompt_tokens == len(world.tok("the model")["input_ids"])
    assert 0 < record.ttft_s <= record.duration_s
    assert len(steps) == 12 and steps[0].prefill_tokens == record.prompt_tokens and steps[1].batch_size == 1


@pytest.mark.parametrize("mode", ["merge", "auto"])
def test_merge_or_batch_gives_the_same_tokens(world, mode):
    """Homogeneous phases run merged, mixed ones unmerged; the tokens equal batch mode's."""
    homogeneous = [("lo1", "the model"), ("lo1", "café 日本"), ("lo1", "ok ok a b")]
    mixed = [("lo1", "the task"), ("", "b"), ("beta", "query answer rank")]
    merged_seen = []
    observer = SimpleNamespace(step=lambda r: merged_seen.append(world.adapted.merged is not None),
                               request_finished=lambda r: None)

    def run(**config):
        with engine(world, **config) as eng:
            first = [eng.submit(t, p, GREEDY) for t, p in homogeneous]
            out = [h.result(WAIT).token_ids for h in first]
            merged_after_homogeneous = world.adapted.merged is not None
            second = [eng.submit(t, p, GREEDY) for t, p in mixed]
            out += [h.result(WAIT).token_ids for h in second]
            return out, merged_after_homogeneous

    want, merged = run(merge_mode="batch")
    assert not merged
    got, merged = run(merge_mode=mode, merge_after_steps=3, observer=observer)
    assert got == want
    assert merged and any(merged_seen) and not all(merged_seen)
    world.adapted.unmerge()


def test_gpt2_engine_batches_adapters(tmp_path):
    model = lm("gpt2", peak=8.0)
    adapted = AdaptedModel(model)
    adapters = {"g1": make_adapter("lora", adapted, "gpt2", "g1", tmp_path, seed=5),
                "gm": make_adapter("mtl_lora", adapted, "gpt2", "gm", tmp_path, seed=6)}
    requests = [("g1", "the model"), ("", "ok"), ("beta", "café"), ("gm/alpha", "the task")]
    tok = build_tokenizer()

    def make():
        return Engine(adapted, tok, FakeManager(adapted, adapters), EngineConfig(max_seq_len=64, max_slots=4))

    with make() as eng:
        alone = [eng.generate(t, p, GREEDY, timeout=WAIT).token_ids for t, p in requests]
    with make() as eng:
        together = [h.result(WAIT).token_ids for h in [eng.submit(t, p, GREEDY) for t, p in requests]]
    assert together == alone


# ---- with the real AdapterManager (server/manager.py) ----
def test_real_manager_with_fewer_device_slots_than_adapters(world, sequential):
    manager_module = pytest.importorskip("loraplex.server.manager")
    for name, adapter in world.adapters.items():
        adapter.save(world.tmp / "real" / name)
    manager = manager_module.AdapterManager(world.adapted, world.tmp / "real", device_capacity=2, host_capacity=3)
    try:
        manager.load_all(strict=True)
        with engine(world, manager) as eng:
            handles = [eng.submit(t, p, GREEDY) for t, p in REQUESTS]
            results = [h.result(WAIT) for h in handles]
    finally:
        manager.close()
    assert [r.token_ids for r in results] == [r.token_ids for r in sequential]
    assert all(info.residency in ("host", "device") for info in manager.list_adapters())


def test_real_manager_unknown_task_and_unloaded_adapter(world, sequential):
    manager_module = pytest.importorskip("loraplex.server.manager")
    for name, adapter in world.adapters.items():
        adapter.save(world.tmp / "real2" / name)
    manager = manager_module.AdapterManager(world.adapted, world.tmp / "real2")
    try:
        manager.load_all(strict=True)
        with engine(world, manager) as eng:
            with pytest.raises(UnknownTaskError):
                eng.submit("nope", "ok", GREEDY)
            assert eng.generate(*REQUESTS[4], GREEDY, timeout=WAIT).token_ids == sequential[4].token_ids
            manager.unload("lo2")
            with pytest.raises(UnknownTaskError):
                eng.submit("lo2", "ok", GREEDY)
    finally:
        manager.close()


def test_real_manager_replace_keeps_in_flight_requests_on_their_version(world, sequential):
    manager_module = pytest.importorskip("loraplex.server.manager")
    for name, adapter in world.adapters.items():
        adapter.save(world.tmp / "real3" / name)
    manager = manager_module.AdapterManager(world.adapted, world.tmp / "real3")
    steps = []

    def on_step(record):  # replace lo1 by lo2's weights from the engine thread, mid-request: deterministic
        steps.append(record)
        if len(steps) == 3:
            manager.load("lo1", "lo2", replace=True)

    observer = SimpleNamespace(step=on_step, request_finished=lambda r: None)
    try:
        manager.load_all(strict=True)
        with engine(world, manager, observer=observer) as eng:
            in_flight = eng.generate(*REQUESTS[1], GREEDY, timeout=WAIT)
            after = eng.generate("lo1", REQUESTS[3][1], GREEDY, timeout=WAIT)
    finally:
        manager.close()
    assert in_flight.token_ids == sequential[1].token_ids  # the old lo1 to the end
    assert after.token_ids == sequential[3].token_ids  # the new lo1 is lo2's weights


def test_prefill_budget_bounds_prompt_tokens_per_step(world, sequential):
    steps = []
    observer = SimpleNamespace(step=steps.append, request_finished=lambda r: None)
    prompts_ = [world.tok(p)["input_ids"] for _, p in REQUESTS]
    with engine(world, max_prefill_tokens=6, observer=observer) as eng:
        handles = [eng.submit(t, p, GREEDY) for t, p in REQUESTS]
        results = [h.result(WAIT) for h in handles]
    assert [r.token_ids for r in results] == [r.token_ids for r in sequential]
    longest = max(len(p) for p in prompts_)
    assert all(s.prefill_tokens <= max(6, longest) for s in steps)
    assert sum(s.prefill_tokens for s in steps) == sum(len(p) for p in prompts_)
    assert sum(1 for s in steps if s.prefill_tokens) >= 3  # admissions were spread over several steps


def test_memory_a_burst_freed_goes_back_when_the_engine_idles(world, monkeypatch):
    """On the CPU the engine keeps freed activations for its next steps (host_memory.py) and hands them back to
    the system once nothing is running or queued: once per burst, never under a running request."""
    retained, released = [], []
    monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: retained.append(True))
    with engine(world) as eng:
        monkeypatch.setattr(host_memory, "release_free_memory", lambda: released.append(eng.stats().running))
        handles = [eng.submit(task, "ok", GREEDY) for task in ("lo1", "lo2", "")]
        for handle in handles:
            handle.result(timeout=WAIT)
        deadline = time.monotonic() + WAIT
        while not released and time.monotonic() < deadline:
            time.sleep(0.01)
        assert released == [0] and retained == [True]
        eng.generate("alpha", "ok", GREEDY, timeout=WAIT)
        while len(released) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert released == [0, 0]
    with engine(world, retain_host_memory=False) as eng:
        eng.generate("lo1", "ok", GREEDY, timeout=WAIT)
    assert retained == [True]


def test_requests_finish_promptly(world):
    """Guard against a loop that sleeps between steps: 12 tokens of a tiny model take well under a second."""
    with engine(world) as eng:
        eng.generate("", "ok", GREEDY, timeout=WAIT)  # warm
        start = time.perf_counter()
        eng.generate("lo1", "ok", GREEDY, timeout=WAIT)
        assert time.perf_counter() - start < 5.0


# ---- loading the base model ----
def test_load_base_round_trip(tmp_path):
    from loraplex.server.loader import load_base

    lm("qwen3").save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    model, tok = load_base(str(tmp_path), device="cpu", dtype="auto")
    assert type(model).__name__ == "Qwen3ForCausalLM" and not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu" and len(tok) == len(build_tokenizer())
    model, _ = load_base(str(tmp_path), device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_loaded_base_weights_do_not_follow_the_files(tmp_path):
    """A checkpoint rewritten in place (or truncated: SIGBUS) must not reach a served model's weights."""
    from loraplex.server.loader import load_base

    lm("gpt2").save_pretrained(tmp_path)  # GPT-2: its head is tied to the input embedding
    build_tokenizer().save_pretrained(tmp_path)
    model, _ = load_base(str(tmp_path), device="cpu", dtype="float32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = tmp_path / "model.safetensors"
    with open(weights, "r+b") as f:  # same size, every tensor's bytes changed: what `cp new old` does
        f.seek(4096)
        f.write(bytes(range(256)) * ((weights.stat().st_size - 4096) // 256))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is embed.weight  # tied weights stay tied


def test_load_base_errors_say_what_is_wrong(tmp_path):
    from transformers import BertConfig

    from loraplex.server.loader import ModelLoadError, load_base

    with pytest.raises(ModelLoadError, match="cannot read a model config"):
        load_base(str(tmp_path / "missing"), device="cpu")
    BertConfig().save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelLoadError, match="'bert' is not supported; loraplex serves llama, mistral"):
        load_base(str(tmp_path / "bert"), device="cpu")
    with pytest.raises(ModelLoadError, match="dtype"):
        load_base(str(tmp_path / "bert"), device="cpu", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="cuda"):
            load_base(str(tmp_path / "bert"), device="cuda")


@pytest.mark.parametrize("field,value", [("merge_mode", "sometimes"), ("max_slots", 0), ("max_seq_len", 0),
                                         ("max_queued_requests", -1), ("max_prefill_tokens", 0)])
def test_bad_engine_config_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_the_prefill_budget_is_the_configured_one_or_the_devices_default(world):
    assert engine(world).prefill_budget == 512  # on CPU; 4096 on CUDA, where a prefill step costs host time
    assert engine(world, max_prefill_tokens=6).prefill_budget == 6


def test_real_manager_unload_mid_request_lets_it_finish(world, sequential):
    manager_module = pytest.importorskip("loraplex.server.manager")
    for name, adapter in world.adapters.items():
        adapter.save(world.tmp / "real4" / name)
    manager = manager_module.AdapterManager(world.adapted, world.tmp / "real4")
    steps = []

    def on_step(record):  # unload lo1 from the engine thread while its request runs: deterministic
        steps.append(record)
        if len(steps) == 3:
            manager.unload("lo1")

    observer = SimpleNamespace(step=on_step, request_finished=lambda r: None)
    try:
        manager.load_all(strict=True)
        with engine(world, manager, observer=observer) as eng:
            in_flight = eng.generate(*REQUESTS[1], GREEDY, timeout=WAIT)
            with pytest.raises(UnknownTaskError):
                eng.submit("lo1", "ok", GREEDY)
    finally:
        manager.close()
    assert REQUESTS[1][0] == "lo1"
    assert in_flight.token_ids == sequential[1].token_ids  # finished on the adapter it started with


def test_the_factor_pool_gets_a_slot_per_adapter_the_device_holds(world):
    manager = FakeManager(world.adapted, world.adapters)
    manager.device_capacity = 5
    engine(world, manager, max_slots=4)
    assert world.adapted.factor_pool._reserved == 4  # a batch stacks at most one adapter per sequence
    engine(world, manager, max_slots=16)
    assert world.adapted.factor_pool._reserved == 5


# ---- on CUDA (marked gpu; skipped where torch sees no GPU, as in CI) ----
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("grouped_kernels", ["torch", "triton"])
def test_on_cuda_a_mixed_batch_equals_each_request_alone(world, sequential, monkeypatch, grouped_kernels):
    """The engine on the GPU, either grouped path (serve --grouped-kernels): the mixed batch equals every
    request run alone on the GPU, and the CPU's tokens, token-exact. In float32 only: in bfloat16 the GPU's
    matmuls round differently at different batch sizes, and a near-tie can flip (docs/design.md §12)."""
    from loraplex.adapters import kernels

    monkeypatch.setattr(kernels, "_enabled", grouped_kernels == "triton")
    calls = []
    original = kernels.lowrank_delta
    monkeypatch.setattr(kernels, "lowrank_delta", lambda *a, **k: calls.append(1) or original(*a, **k))
    adapted = AdaptedModel(lm("llama", peak=8.0).cuda())  # world.model's weights (same seed)

    def make() -> Engine:
        return Engine(adapted, world.tok, FakeManager(adapted, world.adapters),
                      EngineConfig(max_seq_len=64, max_slots=8, cuda_graphs=False))  # eager: test_graphs.py has graphs

    with make() as eng:
        alone = [eng.generate(t, p, GREEDY, timeout=WAIT).token_ids for t, p in REQUESTS]
    with make() as eng:
        together = [h.result(WAIT).token_ids for h in [eng.submit(t, p, GREEDY) for t, p in REQUESTS]]
    assert together == alone == [r.token_ids for r in sequential]
    # the stacked groups went through the Triton kernels, or not at all
    assert bool(calls) == (grouped_kernels == "triton" and kernels.triton_available())
