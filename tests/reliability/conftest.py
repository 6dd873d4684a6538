"""Shared fixtures of the reliability suite: a module's directory of real adapters, a server over it with small
adapter tiers (so that requests keep evicting adapters and reloading them from disk), and an idle check.

The adapters: LoRA `lo00` ... `lo23` (each serves the task id of its name) and MTL-LoRA `mta` (tasks a1, a2,
a3) and `mtb` (tasks b1, b2), all on `peaky_lm`, each with its own seed. Tests that need all of them ask the
server (ListAdapters, ListTasks) rather than this file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from families import make_adapter
from servers import WAIT, options, peaky_lm, start, wait_until

from loraplex.adapters import AdaptedModel
from loraplex.server.app import BackgroundServer
from loraplex_client import Client

LORAS = 24
MTLS = {"mta": ["a1", "a2", "a3"], "mtb": ["b1", "b2"]}


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory) -> Path:
    """A fresh directory of the 26 adapters above, per test module (tests may break or add adapters in it)."""
    root = tmp_path_factory.mktemp("adapters")
    adapted = AdaptedModel(peaky_lm())
    for seed in range(LORAS):
        make_adapter("lora", adapted, "llama", f"lo{seed:02d}", root, seed=seed)
    for seed, (name, tasks) in enumerate(MTLS.items(), start=LORAS):
        make_adapter("mtl_lora", adapted, "llama", name, root, seed=seed, tasks=tasks)
    return root


@pytest.fixture(scope="module")
def server(adapter_root) -> BackgroundServer:
    """A started server of `adapter_root`: 4 adapters on the device, 8 in host memory, 16 running sequences."""
    bg = start(options(adapter_dir=str(adapter_root), device_adapters=4, host_adapters=8))
    yield bg
    bg.stop(grace=1.0)


@pytest.fixture(scope="module")
def client(server) -> Client:
    with Client(server.address, timeout=WAIT) as c:
        yield c


@pytest.fixture
def assert_idle(server) -> Callable[[], None]:
    """A check that the engine has let go of everything: nothing running or queued, every KV slot and token
    free, no adapter lease held (waits for the engine's last step first)."""

    def check() -> None:
        engine, manager = server.server.engine, server.server.manager
        wait_until(lambda: (engine.stats().running, engine.stats().queue_depth) == (0, 0), what="an idle engine")
        stats = engine.stats()
        assert (stats.slots_used, stats.kv_bytes_used) == (0, 0), stats
        with manager._lock:  # white box: the lease counts that keep adapters from being evicted
            assert sum(e.leases for e in manager._entries.values()) == 0 and not manager._retired_bound

    return check
