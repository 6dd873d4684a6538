"""Faults while serving: clients that leave, deadlines, adapters broken on disk, racing admins, SIGTERM.

What it exercises (figures as set below), on the module server of conftest.py (26 adapters, 4 on the device,
8 in host memory, 16 running sequences), beyond tests/test_server.py's one-request cases:
- 12 streams of LONG tokens filling the batch with 4 short streams that must finish exactly: 6 clients break out
  of `generate_stream`, 3 close it, 3 asyncio tasks are cancelled, each after a few chunks. Every cancelled
  request ends "cancelled" in the engine far short of LONG, every KV slot and token is freed, no adapter lease
  is left, and 16 requests at once are served right after;
- 14 requests on LONG tokens with short deadlines at once (8 unary, 4 streams cut mid-stream, 2 asyncio):
  every one gets DEADLINE_EXCEEDED, is counted so, and leaves the engine;
- 4 faults on disk of an adapter loaded under a name other than its directory's: directory deleted, weights
  overwritten with garbage (same size and mtime), weights truncated, config rewritten. A request running on it
  when the fault happens finishes unchanged; once it is evicted to disk, unary and streaming requests to it get
  FAILED_PRECONDITION naming it, while other adapters serve and health stays SERVING; LoadAdapter with replace
  of a fixed copy heals it (same tokens as before the fault);
- LoadAdapter races, 3 rounds each: 8 threads loading one name at once, and 7 threads loading different names
  that share a task id (6 MTL-LoRA copies and one LoRA named after the task): exactly one wins, the others
  get ALREADY_EXISTS, ListAdapters and ListTasks agree, and every loser loads once the winner is unloaded;
- `loraplex serve` as a subprocess (embedded default model, 2 LoRA adapters): SIGTERM with 16 streams of
  SIGTERM_TOKENS tokens in flight; new calls get UNAVAILABLE at once while the 16 finish in full (greedy
  answers of one task equal), and the process exits 0 within the grace.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from families import make_adapter
from servers import LONG, WAIT, capture_handles, peaky_lm, serve_process, wait_until

from loraplex.adapters import AdaptedModel
from loraplex.adapters.io import CONFIG_FILE, WEIGHTS_FILE
from loraplex.server.app import BackgroundServer
from loraplex.server.default_model import load_default
from loraplex_client import (
    AlreadyExistsError,
    AsyncClient,
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    LoraplexError,
    UnavailableError,
)

SIGTERM_TOKENS = 160  # the default model has 256 positions; the prompt takes 13
BATCH = 16  # the module server's running sequences (tests/servers.py options)


@pytest.fixture(scope="module")
def loras(client) -> list[str]:
    """The module server's LoRA adapters (conftest.py: lo00 ... lo23)."""
    return sorted(a.name for a in client.list_adapters() if a.adapter_type == "lora")


def requests_with_code(bg: BackgroundServer, code: str) -> float:
    """loraplex_requests_total{code=code}, summed over adapters."""
    return sum(s.value for family in bg.server.metrics.registry.collect() for s in family.samples
               if s.name == "loraplex_requests_total" and s.labels.get("code") == code)


def tokens(chunks: list) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def serves_a_burst(client: Client, loras: list[str], n: int = BATCH) -> None:
    """n requests at once over n adapters, each exactly as long as asked."""
    with ThreadPoolExecutor(n) as pool:
        got = list(pool.map(lambda i: client.generate(loras[i % len(loras)], "ok", max_new_tokens=3, ignore_eos=True),
                            range(n)))
    assert [r.generated_tokens for r in got] == [3] * n


# ---------------------------------------------------------------------- clients that leave
def test_many_clients_leaving_mid_stream_free_the_batch(server, client, loras, assert_idle, monkeypatch):
    handles = capture_handles(server, monkeypatch)
    survivors = [("lo01", "the model"), ("a1", "ok ok a b"), ("", "b a"), ("lo02", "the task")]
    alone = {s: client.generate(*s, max_new_tokens=40, ignore_eos=True).token_ids for s in survivors}
    handles.clear()
    leavers = ["", "lo00", "lo01", "a1"]  # with the survivors', 4 adapters: the 4 device slots hold them at once
    started = threading.Barrier(6 + 3 + len(survivors) + 1, timeout=WAIT)  # every caller has its first chunk
    results: dict = {}

    def break_out(i: int) -> None:
        for n, _ in enumerate(client.generate_stream(leavers[i % 4], "the model", max_new_tokens=LONG,
                                                     ignore_eos=True)):
            if n == 0:
                started.wait()
            if n == 2 + i % 3:
                break  # the generator is dropped here: the SDK cancels the call

    def close(i: int) -> None:
        stream = client.generate_stream(leavers[i % 4], "query", max_new_tokens=LONG, ignore_eos=True)
        next(stream)
        started.wait()
        next(stream)
        stream.close()

    def survive(s: tuple[str, str]) -> None:
        stream = client.generate_stream(*s, max_new_tokens=40, ignore_eos=True)
        chunks = [next(stream)]
        started.wait()
        results[s] = chunks + list(stream)

    async def cancelled_tasks(address: str) -> None:
        async with AsyncClient(address, timeout=WAIT) as ac:
            first = [asyncio.Event() for _ in range(3)]

            async def consume(i: int) -> None:
                async for _ in ac.generate_stream(leavers[i], "end", max_new_tokens=LONG, ignore_eos=True):
                    first[i].set()

            tasks = [asyncio.create_task(consume(i)) for i in range(3)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first)), WAIT)
            await asyncio.to_thread(started.wait)
            for task in tasks:
                task.cancel()
            done = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(d, asyncio.CancelledError) for d in done)

    with ThreadPoolExecutor(6 + 3 + len(survivors) + 1) as pool:
        callers = [pool.submit(break_out, i) for i in range(6)] + [pool.submit(close, i) for i in range(3)]
        callers += [pool.submit(survive, s) for s in survivors]
        callers.append(pool.submit(asyncio.run, cancelled_tasks(server.address)))
        for caller in callers:
            caller.result(WAIT)  # raises what the caller raised

    ended = [h.result(WAIT) for h in handles]
    assert len(ended) == 12 + len(survivors)
    cancelled = [r for r in ended if r.finish_reason == "cancelled"]
    assert len(cancelled) == 12 and all(r.generated_tokens < LONG // 4 for r in cancelled), cancelled
    assert sorted((r.finish_reason, r.generated_tokens) for r in ended if r.finish_reason != "cancelled") == \
        [("length", 40)] * len(survivors)
    for s in survivors:
        assert results[s][-1].finish_reason == "length" and tokens(results[s]) == alone[s], s
    assert_idle()
    serves_a_burst(client, loras)


def test_deadlines_under_load_all_expire_and_leave_the_engine(server, client, loras, assert_idle, monkeypatch):
    """Four adapters in all (lo00, lo01, lo02, mta): every request runs at once, none waits for a device slot."""
    handles = capture_handles(server, monkeypatch)
    before = requests_with_code(server, "DEADLINE_EXCEEDED")
    unary: list = []
    streams: list = []  # (error, chunks received before it)

    def call(i: int) -> None:
        try:
            client.generate(loras[i % 3], "the model", max_new_tokens=LONG, ignore_eos=True, timeout=0.5)
        except LoraplexError as err:
            unary.append(err)

    def stream(i: int) -> None:
        got = []
        try:
            for chunk in client.generate_stream("a2", "the model", max_new_tokens=LONG, ignore_eos=True, timeout=1.0):
                got.append(chunk)
        except LoraplexError as err:
            streams.append((err, len(got)))

    async def deadlines(address: str) -> list:
        async with AsyncClient(address, timeout=WAIT) as ac:
            return await asyncio.gather(
                ac.generate("", "end", max_new_tokens=LONG, ignore_eos=True, timeout=0.5),
                ac.generate("mta/a3", "end", max_new_tokens=LONG, ignore_eos=True, timeout=0.5),
                return_exceptions=True)

    with ThreadPoolExecutor(13) as pool:  # all 14 at once
        callers = [pool.submit(call, i) for i in range(8)] + [pool.submit(stream, i) for i in range(4)]
        aio = pool.submit(asyncio.run, deadlines(server.address)).result(WAIT)
        for caller in callers:
            caller.result(WAIT)
    assert len(unary) == 8 and all(isinstance(e, DeadlineExceededError) for e in unary), unary
    assert len(streams) == 4 and all(isinstance(e, DeadlineExceededError) and n > 0 for e, n in streams), streams
    assert len(aio) == 2 and all(isinstance(e, DeadlineExceededError) for e in aio), aio
    assert len(handles) == 14
    for handle in handles:
        result = handle.result(WAIT)
        assert result.finish_reason == "cancelled" and result.generated_tokens < LONG, (handle.task_id, result)
    wait_until(lambda: requests_with_code(server, "DEADLINE_EXCEEDED") == before + 14, what="14 deadlines counted")
    assert_idle()
    serves_a_burst(client, loras)


# ---------------------------------------------------------------------- adapters broken on disk
def _garble(directory: Path) -> None:
    """Same size, same inode, same mtime: nothing short of reading the weights shows it."""
    weights = directory / WEIGHTS_FILE
    st = weights.stat()
    with open(weights, "r+b") as f:
        f.write(os.urandom(st.st_size))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))


def _truncate(directory: Path) -> None:
    weights = directory / WEIGHTS_FILE
    os.truncate(weights, weights.stat().st_size // 2)


def _rewrite_config(directory: Path) -> None:
    config = directory / CONFIG_FILE
    data = json.loads(config.read_text())
    data["r"] = data.get("r", 4) * 2
    config.write_text(json.dumps(data))


FAULTS = {"directory deleted": shutil.rmtree, "weights overwritten with garbage": _garble,
          "weights truncated": _truncate, "config rewritten": _rewrite_config}


def evict_to_disk(client: Client, name: str, others: list[str]) -> None:
    """Serve the `others` in turn until adapter `name` is in neither memory tier."""
    for i in range(4 * len(others)):
        if {a.name: a.residency for a in client.list_adapters()}[name] == "disk":
            return
        assert client.generate(others[i % len(others)], "ok", max_new_tokens=1).generated_tokens == 1
    raise AssertionError(f"adapter {name!r} was never evicted")


@pytest.mark.parametrize("fault", FAULTS)
def test_adapter_broken_on_disk_while_serving(server, client, adapter_root, loras, assert_idle, fault):
    index = list(FAULTS).index(fault)
    name, files = f"victim{index}", f"victim{index}-files"  # the name is not the directory's: errors must name it
    shutil.copytree(adapter_root / loras[20 + index], adapter_root / files)
    client.load_adapter(name, files)
    want = client.generate(name, "the model", max_new_tokens=100, ignore_eos=True).token_ids
    running = client.generate_stream(name, "the model", max_new_tokens=100, ignore_eos=True)
    chunks = [next(running)]  # its weights are on the device, leased

    FAULTS[fault](adapter_root / files)
    assert server.server.engine.stats().running == 1  # the fault happened under it
    chunks += list(running)
    assert chunks[-1].finish_reason == "length" and tokens(chunks) == want  # served from memory, unchanged
    evict_to_disk(client, name, loras)  # the next request has to read the files again
    for call in (lambda: client.generate(name, "the model", max_new_tokens=4),
                 lambda: list(client.generate_stream(name, "the model", max_new_tokens=4))):
        with pytest.raises(FailedPreconditionError) as info:
            call()
        assert repr(name) in info.value.details
        assert client.generate("lo03", "ok", max_new_tokens=2, ignore_eos=True).generated_tokens == 2
    assert client.health() and name in {a.name for a in client.list_adapters()}  # still registered, not served

    shutil.copytree(adapter_root / loras[20 + index], adapter_root / f"{files}-fixed")
    client.load_adapter(name, f"{files}-fixed", replace=True)
    assert client.generate(name, "the model", max_new_tokens=100, ignore_eos=True).token_ids == want
    client.unload_adapter(name)
    assert_idle()


# ---------------------------------------------------------------------- racing admins
def registry(client: Client) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({adapter: its tasks}, {task id: adapter}), checked to agree: every task id routes to a listed adapter,
    and every listed adapter serves exactly the task ids CONTRACT.md gives it."""
    adapters = {a.name: a.tasks for a in client.list_adapters()}
    routes = {t.task_id: t.adapter for t in client.list_tasks()}
    expected = {}
    for name, tasks in adapters.items():
        ids = [name] if tasks == [name] else [*tasks, *(f"{name}/{t}" for t in tasks)]
        expected.update({task_id: name for task_id in ids})
    assert routes == expected
    return adapters, routes


def race(client: Client, loads: list[tuple[str, str]]) -> tuple[list[str], list[LoraplexError]]:
    """Every (name, path) load at once; (names loaded, errors)."""
    gate = threading.Barrier(len(loads), timeout=WAIT)

    def load(name_path: tuple[str, str]):
        gate.wait()
        try:
            return client.load_adapter(*name_path).name
        except LoraplexError as err:
            return err

    with ThreadPoolExecutor(len(loads)) as pool:
        outcomes = list(pool.map(load, loads))
    return [o for o in outcomes if isinstance(o, str)], [o for o in outcomes if not isinstance(o, str)]


def test_racing_loads_register_exactly_one(server, client, adapter_root, loras):
    shutil.copytree(adapter_root / loras[10], adapter_root / "racer-files")
    make_adapter("mtl_lora", AdaptedModel(peaky_lm()), "llama", "shared-files", adapter_root, seed=99,
                 tasks=["s1", "s2"])
    before, _ = registry(client)
    contests = {
        "one name": [("racer", "racer-files")] * 8,
        "one task id": [(f"r{i}", "shared-files") for i in range(6)] + [("s1", "racer-files")],
    }
    for contest, loads in contests.items():
        for _ in range(3):
            won, errors = race(client, loads)
            assert len(won) == 1 and len(errors) == len(loads) - 1, (contest, won, errors)
            assert all(isinstance(e, AlreadyExistsError) for e in errors), errors
            adapters, routes = registry(client)
            assert set(adapters) == set(before) | set(won)  # no loser half-registered
            assert routes[loads[0][0] if contest == "one name" else "s1"] == won[0]
            assert client.generate(next(t for t, a in routes.items() if a == won[0]), "ok", max_new_tokens=2,
                                   ignore_eos=True).adapter == won[0]
            client.unload_adapter(won[0])
        for name, path in dict(loads).items():  # every loser loads alone: nothing of it was left behind
            client.load_adapter(name, path)
            client.unload_adapter(name)
    assert registry(client)[0] == before


# ---------------------------------------------------------------------- SIGTERM under load
def test_sigterm_under_load_finishes_in_flight_refuses_new_and_exits_0(tmp_path):
    adapted = AdaptedModel(load_default("cpu")[0])
    for seed, name in enumerate(["d1", "d2"]):
        make_adapter("lora", adapted, "llama", name, tmp_path, seed=seed)
    args = ["--port", "0", "--metrics-port", "-1", "--device", "cpu", "--adapter-dir", str(tmp_path),
            "--shutdown-grace", "30"]
    with serve_process(args) as server:
        proc, address = server.proc, server.address
        task_ids = ["", "d1", "d2"]
        in_flight = threading.Barrier(BATCH + 1, timeout=WAIT)
        finished = []

        def stream(i: int) -> list:
            chunks = []
            for chunk in client.generate_stream(task_ids[i % 3], "The film was", max_new_tokens=SIGTERM_TOKENS,
                                                ignore_eos=True):
                chunks.append(chunk)
                if len(chunks) == 1:
                    in_flight.wait()
            finished.append(i)
            return chunks

        with Client(address, timeout=WAIT) as client, ThreadPoolExecutor(BATCH) as pool:
            streams = [pool.submit(stream, i) for i in range(BATCH)]
            in_flight.wait()
            proc.send_signal(signal.SIGTERM)
            wait_until(lambda: client.health_status() == "NOT_SERVING", what="NOT_SERVING")
            refused_at = time.monotonic()
            with pytest.raises(UnavailableError, match="shutting down"):
                client.generate("d1", "too late", max_new_tokens=2, timeout=5)
            with pytest.raises(UnavailableError, match="shutting down"):
                list(client.generate_stream("", "too late", max_new_tokens=2, timeout=5))
            assert time.monotonic() - refused_at < 5 and len(finished) < BATCH  # refused while still draining
            results = [s.result(WAIT) for s in streams]
        for i, chunks in enumerate(results):
            assert chunks[-1].finish_reason == "length" and len(tokens(chunks)) == SIGTERM_TOKENS
            assert tokens(chunks) == tokens(results[i % 3])  # greedy: the same task, the same answer
        assert proc.wait(timeout=30) == 0  # within --shutdown-grace
        with Client(address, timeout=5) as late, pytest.raises(UnavailableError):
            late.generate("", "gone", max_new_tokens=1)
    assert any("SIGTERM" in line for line in server.log) and "Traceback" not in "".join(server.log)
