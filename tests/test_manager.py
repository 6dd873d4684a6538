"""AdapterManager: tiers and LRU eviction, pinning, leases, background loads, replace/unload, task ids, paths."""

from __future__ import annotations

import gc
import os
import random
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
from families import FAMILY_TARGETS, TASKS, randomize
from tiny import prompts, right_padded, tiny_model

import loraplex.server.manager as manager_module
from loraplex.adapters import AdaptedModel, AdapterError, AdapterFormatError, UnknownTaskError, adapter_class
from loraplex.adapters.io import WEIGHTS_FILE
from loraplex.server import cpu_threads
from loraplex.server.manager import (
    AdapterCapacityError,
    AdapterExistsError,
    AdapterManager,
    AdapterNotFoundError,
    AdapterPathError,
    Lease,
    TaskRoute,
)

WAIT = 10.0  # seconds: every wait is bounded


@pytest.fixture(scope="module")
def adapted() -> AdaptedModel:
    return AdaptedModel(tiny_model("llama"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "adapters").mkdir()
    return tmp_path / "adapters"


def save(adapted: AdaptedModel, directory: Path, name: str, *, adapter_type: str = "lora", seed: int = 0,
         tasks: list[str] | None = None) -> Path:
    """A random adapter saved at directory/name (its config names `name`'s type and tasks)."""
    cls = adapter_class(adapter_type)
    adapter = cls.create(name, adapted.specs, target_modules=FAMILY_TARGETS["llama"], rank=4,
                         tasks=(tasks or TASKS) if cls.multi_task else None, seed=seed)
    randomize(adapter, seed + 100)
    adapter.save(directory / name)
    return directory / name


def make(adapted: AdaptedModel, root: Path, names: list[str], events: list | None = None, **kwargs) -> AdapterManager:
    """A manager over `root` with adapters `names` saved (seeded by position) but not loaded."""
    for i, name in enumerate(names):
        save(adapted, root, name, seed=i)
    sink = (lambda kind, fields: events.append((kind, fields))) if events is not None else None
    return AdapterManager(adapted, root, on_event=sink, **kwargs)


def residency(manager: AdapterManager) -> dict[str, str]:
    return {info.name: info.residency for info in manager.list_adapters()}


def acquire_within(manager: AdapterManager, name: str, timeout: float = WAIT) -> Lease:
    """Retry acquire as an engine would, step after step; raises what acquire raises."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lease = manager.acquire(name)
        if lease is not None:
            return lease
        time.sleep(0.005)
    raise AssertionError(f"{name} not resident after {timeout} s")


def error_within(manager: AdapterManager, name: str, timeout: float = WAIT) -> AdapterError:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            lease = manager.acquire(name)
        except AdapterError as exc:
            return exc
        assert lease is None, f"{name} unexpectedly loaded"
        time.sleep(0.005)
    raise AssertionError(f"no error for {name} after {timeout} s")


def freed(*refs: weakref.ref) -> bool:
    """All referents gone. Without cycles refcounting frees them at once; gc (slow here: ~0.7 s) only if not."""
    if any(r() is not None for r in refs):
        gc.collect()
    return all(r() is None for r in refs)


def logits(adapted: AdaptedModel, assignments) -> torch.Tensor:
    ids = right_padded(prompts([5] * len(assignments), seed=3))
    ids[:] = ids[0]  # the same prompt in every row: rows differ only by their adapter
    with torch.no_grad(), adapted.batch(assignments, rows_per_sequence=ids.shape[1]):
        return adapted.model(ids).logits


# ---------------------------------------------------------------- tiers, LRU, pinning, leases
def test_load_residency_and_host_lru(adapted, root):
    events: list = []
    with make(adapted, root, ["a", "b", "c"], events, device_capacity=1, host_capacity=2) as m:
        info = m.load("a", "a")
        assert (info.name, info.adapter_type, info.tasks, info.rank) == ("a", "lora", ["a"], 4)
        assert info.num_parameters > 0 and info.residency == "device"  # a free slot: promoted
        assert info.nbytes == 4 * info.num_parameters  # fp32 weights, as stored
        assert m.load("b", "b").residency == "host"  # loading never evicts from the device
        m.load("c", "c")  # host tier: a (on device) + b + c > 2 -> b, least recently used, leaves
        assert residency(m) == {"a": "device", "b": "disk", "c": "host"}
        assert m.residency_counts() == {"disk": 1, "host": 1, "device": 1}
        assert ("evict", {"adapter": "b", "tier": "host"}) in events
        loads = [f for k, f in events if k == "load"]
        assert [f["result"] for f in loads] == ["ok"] * 3 and all(f["seconds"] > 0 for f in loads)


def test_device_lru_order(adapted, root):
    events: list = []
    with make(adapted, root, ["a", "b", "c", "d"], events, device_capacity=2, host_capacity=4) as m:
        for name in "abcd":
            m.load(name, name)
        assert residency(m) == {"a": "device", "b": "device", "c": "host", "d": "host"}
        m.acquire("a").release()  # a is now more recently used than b
        assert m.acquire("c") is None  # not resident: scheduled in the background
        assert m.wait_resident("c", WAIT)
        assert residency(m) == {"a": "device", "b": "host", "c": "device", "d": "host"}
        assert ("evict", {"adapter": "b", "tier": "device"}) in events
        promoted = [f for k, f in events if k == "load" and f["adapter"] == "c" and f["source"] == "background"]
        assert [(f["result"], f["from"], f["tier"]) for f in promoted] == [("ok", "host", "device")]
        m.acquire("c").release()
        assert m.wait_resident("d", WAIT)  # a is now the least recently used
        assert residency(m) == {"a": "host", "b": "host", "c": "device", "d": "device"}


def test_pinned_adapter_is_not_evicted(adapted, root):
    with make(adapted, root, ["a", "b", "c"], device_capacity=2, host_capacity=4) as m:
        for name in "abc":
            m.load(name, name)
        m.pin("a")
        assert m.info("a").pinned and m.is_pinned("a") and not m.is_pinned("b")
        assert not m.is_pinned("not served")  # the engine asks about adapters that may have been unloaded
        m.acquire("b").release()  # a is least recently used, but pinned
        assert m.wait_resident("c", WAIT)
        assert residency(m) == {"a": "device", "b": "host", "c": "device"}
        with pytest.raises(AdapterCapacityError):  # a second pin would leave no slot for the rest
            m.pin("b")
        m.unpin("a")
        assert not m.is_pinned("a")
        m.acquire("c").release()
        assert m.wait_resident("b", WAIT)
        assert residency(m) == {"a": "host", "b": "device", "c": "device"}


def test_pin_loads_a_cold_adapter(adapted, root):
    with make(adapted, root, ["a", "b"], device_capacity=2, host_capacity=2) as m:
        m.load("a", "a")
        m.load("b", "b")
        m.acquire("a").release()
        m.acquire("b").release()
        m.unload("a")
        m.load("a", "a")  # the other slot is taken: on the host
        m.pin("a")  # not on the device yet: pinning schedules its load (evicting b)
        assert m.wait_resident("a", WAIT)


def test_leased_adapter_is_never_evicted(adapted, root):
    with make(adapted, root, ["a", "b"], device_capacity=1, host_capacity=2) as m:
        m.load("a", "a")
        m.load("b", "b")
        lease = m.acquire("a")
        for _ in range(3):
            assert m.acquire("b") is None  # every slot is leased: wait, never an error
        assert not m.wait_resident("b", 0.2)
        assert residency(m) == {"a": "device", "b": "host"}
        out = logits(adapted, [(lease.bound, 0)])  # the lease still serves
        assert torch.isfinite(out).all()
        lease.release()
        lease.release()  # idempotent
        with pytest.raises(RuntimeError):
            lease.bound
        assert m.wait_resident("b", WAIT)
        assert residency(m) == {"a": "host", "b": "device"}


def test_cold_adapter_prefetches_to_host_while_slots_are_leased(adapted, root):
    with make(adapted, root, ["a", "b", "c", "d"], device_capacity=1, host_capacity=3) as m:
        for name in "abcd":
            m.load(name, name)
        assert residency(m) == {"a": "device", "b": "disk", "c": "host", "d": "host"}
        lease = m.acquire("a")
        assert m.acquire("b") is None  # no slot, no host room: nothing to do but wait
        assert not m.wait_resident("b", 0.1) and residency(m)["b"] == "disk"
        m.unload("d")  # host room: b is read while a's lease holds the only slot
        assert m.acquire("b") is None
        deadline = time.monotonic() + WAIT
        while residency(m)["b"] != "host" and time.monotonic() < deadline:
            time.sleep(0.005)
        assert residency(m) == {"a": "device", "b": "host", "c": "host"}
        lease.release()
        acquire_within(m, "b").release()
        assert residency(m) == {"a": "host", "b": "device", "c": "host"}


def test_cpu_binding_shares_the_host_tensors(adapted, root):
    with make(adapted, root, ["a"]) as m:
        m.load("a", "a")
        with m.acquire("a") as lease:
            bound = lease.bound
            for module, (a, b, _) in bound.pairs.items():  # LoRA on a float32 CPU model: no copy at all
                assert a.data_ptr() == bound.adapter.factors[module][0].data_ptr()
                assert b.data_ptr() == bound.adapter.factors[module][1].data_ptr()
        assert lease.released


def test_two_leases_on_one_adapter(adapted, root):
    with make(adapted, root, ["a", "b"], device_capacity=1, host_capacity=2) as m:
        m.load("a", "a")
        m.load("b", "b")
        first, second = m.acquire("a"), m.acquire("a")
        assert first.bound is second.bound
        first.release()
        assert not m.wait_resident("b", 0.2)  # still leased by the second
        second.release()
        assert m.wait_resident("b", WAIT)


# ---------------------------------------------------------------- background loading
def test_background_load_does_not_block(adapted, root, monkeypatch):
    with make(adapted, root, ["warm", "filler", "cold", "late"], device_capacity=2, host_capacity=3) as m:
        for name in ["warm", "filler", "cold", "late"]:
            m.load(name, name)  # cold: host, then pushed off by late
        assert residency(m) == {"cold": "disk", "filler": "device", "late": "host", "warm": "device"}
        gate = threading.Event()
        real = manager_module.load_adapter

        def slow_load(path, name=None):
            assert threading.current_thread() is not threading.main_thread()  # never on the caller's thread
            assert gate.wait(WAIT)
            return real(path, name)

        monkeypatch.setattr(manager_module, "load_adapter", slow_load)
        start = time.perf_counter()
        assert m.acquire("cold") is None  # scheduled, not waited for
        assert m.acquire("cold") is None  # already queued: not scheduled twice
        lease = m.acquire("warm")  # warm adapters are served while the cold one loads
        assert lease is not None
        assert time.perf_counter() - start < 1.0
        assert not m.wait_resident("cold", 0.05)
        gate.set()
        assert m.wait_resident("cold", WAIT)
        cold = m.acquire("cold")
        assert isinstance(cold, Lease) and cold.name == "cold"
        cold.release()
        lease.release()


@pytest.mark.skipif(not cpu_threads.uses_openmp(), reason="torch does not run on OpenMP here")
def test_adapter_reads_run_on_one_torch_thread(adapted, root, monkeypatch):
    """Foreground and background reads run single-threaded, so that no thread but the engine's gets an OpenMP
    pool (server/cpu_threads.py), and the caller's own thread count is left as it was."""
    counts: list[tuple[str, int]] = []
    real = manager_module.load_adapter

    def counting_load(path, name=None):
        counts.append((threading.current_thread().name, torch.get_num_threads()))
        return real(path, name)

    def run() -> int:
        torch.set_num_threads(2)
        with make(adapted, root, ["warm", "filler", "cold", "late"], device_capacity=2, host_capacity=3) as m:
            monkeypatch.setattr(manager_module, "load_adapter", counting_load)
            for name in ["warm", "filler", "cold", "late"]:
                m.load(name, name)  # cold: host, then pushed off by late
            assert m.acquire("cold") is None and m.wait_resident("cold", WAIT)  # read again in the background
        return torch.get_num_threads()

    out: list[int] = []
    thread = threading.Thread(target=lambda: out.append(run()), name="caller")
    thread.start()
    thread.join()
    assert out == [2], "the caller's thread count was not restored"
    assert [c for _, c in counts] == [1] * 5
    assert {name for name, _ in counts} - {"caller"}, "no background read happened"


def test_failed_background_load_surfaces_and_isolates(adapted, root):
    events: list = []
    names = ["good", "corrupt", "deleted", "filler"]
    with make(adapted, root, names, events, device_capacity=1, host_capacity=2, retry_failed_after=60.0) as m:
        for name in names:
            m.load(name, name)  # each load pushes the oldest host-only adapter back to disk
        assert residency(m) == {"corrupt": "disk", "deleted": "disk", "filler": "host", "good": "device"}
        (root / "corrupt" / WEIGHTS_FILE).write_bytes(b"\x00garbage, not safetensors")
        for path in (root / "deleted").iterdir():
            path.unlink()
        (root / "deleted").rmdir()

        error = error_within(m, "corrupt")
        assert isinstance(error, AdapterFormatError) and "corrupt" in str(error)
        with pytest.raises(AdapterFormatError):  # still failing until retry_failed_after has passed
            m.acquire("corrupt")
        assert "does not exist" in str(error_within(m, "deleted"))
        lease = m.acquire("good")  # the others are served as before
        assert lease is not None and torch.isfinite(logits(adapted, [(lease.bound, 0)])).all()
        lease.release()
        assert m.resolve("corrupt") == TaskRoute("corrupt", 0)  # still registered, still named
        failures = [f for k, f in events if k == "load" and f["result"] == "error"]
        assert {f["adapter"] for f in failures} == {"corrupt", "deleted"} and all(f["error"] for f in failures)


def test_changed_on_disk_is_refused_until_replaced(adapted, root):
    with make(adapted, root, ["x", "a", "y"], device_capacity=1, host_capacity=2, retry_failed_after=0.0) as m:
        for name in ["x", "a", "y"]:
            m.load(name, name)
        assert residency(m)["a"] == "disk"
        save(adapted, root, "a", seed=7)  # a valid adapter, but not the one that was loaded
        assert "changed on disk" in str(error_within(m, "a"))
        assert m.load("a", "a", replace=True).residency == "host"
        assert m.wait_resident("a", WAIT)  # the error expired (retry_failed_after=0): loads again


# ---------------------------------------------------------------- replace and unload
def test_replace_keeps_in_flight_leases(adapted, root):
    save(adapted, root, "v2", seed=9)
    with make(adapted, root, ["a", "other"], device_capacity=2, host_capacity=4) as m:
        m.load("a", "a")
        m.load("other", "other")
        with pytest.raises(AdapterExistsError, match="'a'"):
            m.load("a", "v2")
        (root / "broken").mkdir()
        with pytest.raises(AdapterFormatError):
            m.load("a", "broken", replace=True)  # a failed replace keeps the old version
        old = m.acquire("a")
        old_bound = old.bound
        m.load("a", "v2", replace=True)
        new = acquire_within(m, "a")
        assert new.bound is not old_bound and old.bound is old_bound
        out = logits(adapted, [(old.bound, 0), (new.bound, 0)])  # both versions serve in one batch
        assert not torch.allclose(out[0], out[1], atol=1e-4)
        dead = weakref.ref(old_bound)
        del old_bound
        old.release()
        assert freed(dead)  # the old version is freed once its last lease ends
        new.release()


def test_replace_waits_for_the_old_versions_slot(adapted, root):
    save(adapted, root, "v2", seed=9)
    with make(adapted, root, ["a"], device_capacity=1, host_capacity=2) as m:
        m.load("a", "a")
        old = m.acquire("a")
        assert m.load("a", "v2", replace=True).residency == "host"  # the old version still holds the slot
        assert m.acquire("a") is None
        old.release()
        new = acquire_within(m, "a")
        assert new.bound is not None
        new.release()


def test_unload_frees_memory(adapted, root):
    with make(adapted, root, ["a", "b"], device_capacity=2, host_capacity=2) as m:
        m.load("a", "a")
        m.load("b", "b")
        lease = m.acquire("a")
        bound_ref, adapter_ref = weakref.ref(lease.bound), weakref.ref(lease.bound.adapter)
        tensor_ref = weakref.ref(next(iter(lease.bound.adapter.tensors.values())))
        m.unload("a")
        with pytest.raises(AdapterNotFoundError):
            m.acquire("a")
        with pytest.raises(UnknownTaskError):
            m.resolve("a")
        assert [i.name for i in m.list_adapters()] == ["b"]
        assert torch.isfinite(logits(adapted, [(lease.bound, 0)])).all()  # in flight: still served
        assert bound_ref() is not None
        lease.release()
        assert freed(bound_ref, adapter_ref, tensor_ref)
        with pytest.raises(AdapterNotFoundError):
            m.unload("a")

        lease = m.acquire("b")  # unloaded without a lease: freed at once
        refs = weakref.ref(lease.bound), weakref.ref(lease.bound.adapter)
        lease.release()
        del lease
        m.unload("b")
        assert freed(*refs)


# ---------------------------------------------------------------- task registry
def test_task_ids_and_collisions(adapted, root):
    save(adapted, root, "multi", adapter_type="mtl_lora")  # tasks alpha, beta, gamma
    save(adapted, root, "alpha")  # a single-task adapter whose id collides with multi's task
    save(adapted, root, "multi2", adapter_type="mtl_lora", tasks=["delta", "gamma"])
    save(adapted, root, "multi3", adapter_type="mtl_lora", tasks=["delta", "beta"])
    with make(adapted, root, ["single"]) as m:
        m.load("single", "single")
        info = m.load("multi", "multi")
        assert (info.adapter_type, info.tasks) == ("mtl_lora", TASKS)
        assert m.resolve("") is None
        assert m.resolve("single") == TaskRoute("single", 0)
        assert m.resolve("beta") == TaskRoute("multi", 1)
        assert m.resolve("multi/gamma") == TaskRoute("multi", 2)
        assert set(m.task_routes()) == {"single", *TASKS, *(f"multi/{t}" for t in TASKS)}
        with pytest.raises(UnknownTaskError, match="nope"):
            m.resolve("nope")
        with pytest.raises(UnknownTaskError):
            m.resolve("multi")  # a multi-task adapter's name is not a task id

        before = (m.list_adapters(), m.task_routes())
        with pytest.raises(AdapterExistsError, match="'alpha'"):
            m.load("alpha", "alpha")
        with pytest.raises(AdapterExistsError, match="'gamma'"):
            m.load("multi2", "multi2")  # delta is free, gamma is not: nothing is loaded
        assert (m.list_adapters(), m.task_routes()) == before

        # a replace frees the ids of the version it replaces
        m.load("multi", "multi3", replace=True)
        assert m.resolve("beta") == TaskRoute("multi", 1) and m.resolve("delta") == TaskRoute("multi", 0)
        with pytest.raises(UnknownTaskError):
            m.resolve("alpha")
        assert m.load("alpha", "alpha").tasks == ["alpha"]
        assert m.resolve("alpha") == TaskRoute("alpha", 0)
        lease = acquire_within(m, "multi")
        assert lease.bound.adapter.tasks == ["delta", "beta"]
        lease.release()


# ---------------------------------------------------------------- paths
def test_paths_are_confined(adapted, root, tmp_path):
    outside = tmp_path / "outside"
    save(adapted, outside, "evil")
    save(adapted, root, "good")
    (root / "nested").mkdir()
    save(adapted, root / "nested", "deep")
    os.symlink(outside / "evil", root / "link")
    (root / "sneaky").mkdir()
    os.symlink(outside / "evil" / "adapter_config.json", root / "sneaky" / "adapter_config.json")
    os.symlink(outside / "evil" / WEIGHTS_FILE, root / "sneaky" / WEIGHTS_FILE)
    with AdapterManager(adapted, root) as m:
        for bad in ["../outside/evil", "good/../../outside/evil", str(outside / "evil"), "link", "sneaky", "", "."]:
            with pytest.raises(AdapterPathError) as caught:
                m.load("x", bad)
            assert isinstance(caught.value, PermissionError) and repr(bad) in str(caught.value)
        assert m.list_adapters() == []
        assert m.load("good", "nested/../good").name == "good"  # '..' that stays inside is fine
        assert m.load("deep", "nested/deep").name == "deep"
        assert m.load("abs", str(root / "good")).name == "abs"  # absolute, but inside
        m.unload("abs")


def test_no_adapter_dir_accepts_any_path(adapted, tmp_path):
    path = save(adapted, tmp_path, "anywhere")
    with AdapterManager(adapted, None) as m:
        assert m.load("anywhere", path).residency == "device"


# ---------------------------------------------------------------- load_all, errors, concurrency
def test_load_all(adapted, root):
    save(adapted, root, "multi", adapter_type="mtl_lora")
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text('{"adapter_type": "lora"}')
    (root / ".staging").mkdir()  # hidden: skipped
    (root / "notes.txt").write_text("not an adapter")
    with make(adapted, root, ["a", "b"], device_capacity=2, host_capacity=4) as m:
        infos = m.load_all()
        assert [i.name for i in infos] == ["a", "b", "multi"]
        assert set(m.load_errors) == {"broken"} and isinstance(m.load_errors["broken"], AdapterFormatError)
        assert [i.residency for i in m.list_adapters()] == ["device", "device", "host"]
        assert [i.name for i in m.load_all()] == ["a", "b", "multi"]  # a rescan keeps what is served
        with pytest.raises(AdapterFormatError):
            m.load_all(strict=True)


def test_bad_adapter_and_unknown_names(adapted, root):
    (root / "pickled").mkdir()
    (root / "pickled" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}')
    (root / "pickled" / "adapter_model.bin").write_bytes(b"not loaded")
    events: list = []
    with make(adapted, root, [], events) as m:
        with pytest.raises(AdapterFormatError, match="pickled"):
            m.load("pickled", "pickled")
        with pytest.raises(AdapterFormatError):
            m.load("bad name!", "pickled")
        with pytest.raises(AdapterNotFoundError):
            m.acquire("missing")
        with pytest.raises(AdapterNotFoundError):
            m.pin("missing")
        assert m.list_adapters() == []
        assert [f["result"] for k, f in events if k == "load"] == ["error", "error"]


def test_event_callback_errors_do_not_break_loading(adapted, root):
    def broken(kind, fields):
        raise RuntimeError("metrics are down")

    save(adapted, root, "a")
    with AdapterManager(adapted, root, on_event=broken) as m:
        assert m.load("a", "a").residency == "device"


def test_concurrent_acquire_release_respects_capacity(adapted, root):
    names = [f"n{i}" for i in range(5)]
    with make(adapted, root, names, device_capacity=2, host_capacity=3, load_workers=2) as m:
        for name in names:
            m.load(name, name)
        failures: list[BaseException] = []
        served: set[str] = set()
        stop = time.monotonic() + 1.5

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                while time.monotonic() < stop:
                    lease = m.acquire(rng.choice(names))
                    counts = m.residency_counts()
                    assert counts["device"] <= 2 and sum(counts.values()) == len(names)
                    if lease is not None:
                        assert lease.bound.adapter.name == lease.name
                        served.add(lease.name)
                        time.sleep(rng.random() * 0.002)
                        lease.release()
                    else:
                        time.sleep(0.001)
            except BaseException as exc:  # noqa: BLE001
                failures.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert not failures, failures
        assert len(served) >= 3  # adapters really moved through the two slots
        assert all(m.wait_resident(name, WAIT) for name in names[:2])


def test_capacities_are_checked(adapted):
    with pytest.raises(ValueError):
        AdapterManager(adapted, None, device_capacity=4, host_capacity=2)
    with pytest.raises(ValueError):
        AdapterManager(adapted, None, device_capacity=0)
