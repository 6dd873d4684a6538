"""`AdapterManager`: which adapters a server serves, where each one lives, and who is using it.

Three tiers, as in S-LoRA and vLLM:
    disk    registered: its directory was read and validated once by `load`, its task ids are served
    host    an `Adapter` with CPU tensors                                  (LRU, at most `host_capacity`)
    device  a `BoundAdapter` on the model's device and dtype, what a forward pass uses
                                                                           (LRU, at most `device_capacity`)
A device-resident adapter also counts on the host tier (its `BoundAdapter` keeps the `Adapter`), so
`host_capacity >= device_capacity`.

A request holds a `Lease` while it runs. A leased or pinned adapter is never evicted; when every device slot
is leased or pinned, `acquire` returns None and the caller retries next step. Moving up a tier (disk read,
bind) happens on worker threads: `acquire` never blocks on I/O, so a cold adapter never stalls warm ones.

Versions. `load(replace=True)` and `unload` retire the current entry: new acquires see the new version (or
nothing), while leases taken before keep their own `BoundAdapter`. A retired entry still holding a device
copy keeps its slot until its last lease ends, then every reference is dropped, so its memory is freed.
A background reload re-checks that the files on disk are still the ones validated at `load` (inode, size,
mtime), so that a server never silently starts serving something other than what an admin loaded; an
adapter edited in place must be loaded again with `replace=True`.

Locking: one lock guards all state. It is never held while reading files, binding, or calling `on_event`.

Events (`on_event(kind, fields)`, for metrics; exceptions in the callback are logged, never raised):
    "load"   {"adapter", "result": "ok"|"error", "seconds", "tier": residency reached ("disk" on error),
              "source": "admin" (load) | "background" (a promotion started by acquire/wait_resident/pin),
              "from": "disk" | "host" (where it started: only "disk" loads read files),
              "error": message (errors only)}
    "evict"  {"adapter", "tier": "device"|"host"}  one tier left under capacity pressure
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import AdaptedModel, Adapter, AdapterError, BoundAdapter, load_adapter
from ..adapters.base import check_name
from ..adapters.errors import AdapterFormatError
from ..adapters.io import CONFIG_FILE, WEIGHTS_FILE
from . import cpu_threads
from .tasks import TaskRoute, TaskTable, routes_of

__all__ = [
    "AdapterCapacityError", "AdapterExistsError", "AdapterInfo", "AdapterManager", "AdapterNotFoundError",
    "AdapterPathError", "Lease", "TaskRoute",
]

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, Any]], None]


class AdapterNotFoundError(AdapterError, LookupError):
    """No adapter of that name is served (never loaded, or unloaded)."""


class AdapterExistsError(AdapterError):
    """The adapter name, or one of its task ids, is already served (and `replace` was not asked for)."""


class AdapterPathError(AdapterError, PermissionError):
    """The adapter path leaves the adapter directory (through `..`, an absolute path or a symlink)."""


class AdapterCapacityError(AdapterError):
    """Pinning would leave no device slot for the adapters that are not pinned."""


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    adapter_type: str
    tasks: list[str]  # the task list of a multi-task adapter; [name] for a single-task one
    rank: int
    num_parameters: int
    residency: str  # "disk" | "host" | "device"
    pinned: bool = False
    nbytes: int = 0  # bytes of the adapter's weights as stored


@dataclass(eq=False)
class _Entry:
    """One loaded version of one adapter name. Mutable state is guarded by the manager's lock."""

    name: str
    path: Path  # resolved adapter directory, inside the adapter dir
    fingerprint: tuple[tuple[int, ...], ...]  # of the files as validated by `load`
    adapter_type: str
    tasks: list[str]
    rank: int
    num_parameters: int
    nbytes: int
    routes: dict[str, TaskRoute]
    host: Adapter | None = None
    bound: BoundAdapter | None = None
    leases: int = 0
    pinned: bool = False
    loading: bool = False  # a background load is queued or running
    reserved: bool = False  # that load holds a device slot while it binds
    retired: bool = False  # unloaded or replaced: no new leases
    error: AdapterError | None = None  # the last background failure, until surfaced and expired
    error_at: float = 0.0
    error_raised: bool = False
    signature: tuple[Any, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.signature = (self.adapter_type, tuple(self.tasks), self.rank, self.num_parameters)

    @property
    def residency(self) -> str:
        return "device" if self.bound is not None else "host" if self.host is not None else "disk"


class Lease:
    """A request's hold on one device-resident version of an adapter: it is not evicted or freed while held.

    Release it when the request ends (idempotent; also a context manager). After release `bound` raises, so
    that a stale lease can neither be used nor keep the adapter's memory alive. A caller that merged the
    bound adapter into the model (`AdaptedModel.merge`) unmerges it before releasing.
    """

    def __init__(self, manager: "AdapterManager", entry: _Entry, bound: BoundAdapter) -> None:
        self.name = entry.name
        self._manager = manager
        self._entry: _Entry | None = entry
        self._bound: BoundAdapter | None = bound

    @property
    def bound(self) -> BoundAdapter:
        if self._bound is None:
            raise RuntimeError(f"the lease on adapter {self.name!r} was released")
        return self._bound

    @property
    def released(self) -> bool:
        return self._bound is None

    def release(self) -> None:
        self._manager._release(self)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lease({self.name!r}{', released' if self.released else ''})"


class AdapterManager:
    """Loads, tiers, leases and unloads the adapters served on one `AdaptedModel`.

    adapter_dir: the only directory adapters may be loaded from (None: any path, for tests and scripts).
    host_capacity / device_capacity: how many adapters each tier holds before LRU eviction.
    load_workers: threads that read and bind adapters in the background.
    retry_failed_after: seconds a failed background load keeps answering `acquire` with its error before
        the next `acquire` tries again (the error is always raised at least once).
    """

    def __init__(self, adapted: AdaptedModel, adapter_dir: str | os.PathLike | None = None, *,
                 host_capacity: int = 64, device_capacity: int = 32, load_workers: int = 2,
                 on_event: EventSink | None = None, retry_failed_after: float = 1.0) -> None:
        if device_capacity < 1 or host_capacity < device_capacity:
            raise ValueError(f"need 1 <= device_capacity <= host_capacity, got device_capacity={device_capacity}, "
                             f"host_capacity={host_capacity}")
        if load_workers < 1:
            raise ValueError(f"load_workers must be at least 1, got {load_workers}")
        self.adapted = adapted
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir is not None else None
        self.host_capacity = host_capacity
        self.device_capacity = device_capacity
        self.retry_failed_after = retry_failed_after
        self.load_errors: dict[str, AdapterError] = {}  # from the last load_all, by directory name
        self._on_event = on_event
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified whenever residency or leases change
        self._entries: dict[str, _Entry] = {}
        self._tasks = TaskTable()
        self._host_lru: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._device_lru: OrderedDict[str, _Entry] = OrderedDict()
        self._retired_bound: set[_Entry] = set()  # retired versions whose device copy is still leased
        self._reserved = 0  # device slots held by background loads that are binding
        self._closed = False
        # one torch thread each: a worker with an OpenMP pool of its own would slow the engine (cpu_threads.py)
        self._pool = ThreadPoolExecutor(max_workers=load_workers, thread_name_prefix="loraplex-adapter-load",
                                        initializer=cpu_threads.set_threads, initargs=(1,))

    # ------------------------------------------------------------------ registration
    def load_all(self, *, strict: bool = False) -> list[AdapterInfo]:
        """Load every adapter directory directly under `adapter_dir` (hidden entries are skipped).

        A bad adapter does not stop the others: its error is logged and kept in `load_errors`, unless
        `strict`, which raises it. A name already served from the same directory is kept as it is.
        """
        if self.adapter_dir is None:
            raise ValueError("load_all needs an adapter directory")
        if not self.adapter_dir.is_dir():
            raise FileNotFoundError(f"adapter directory {str(self.adapter_dir)!r} does not exist")
        self.load_errors = {}
        infos = []
        for child in sorted(self.adapter_dir.iterdir()):
            if child.name.startswith(".") or not child.is_dir():
                continue  # hidden, or a half-written staging directory of write_adapter_dir
            try:
                directory = self._confine(child.name)
                with self._lock:
                    current = self._entries.get(child.name)
                    if current is not None and current.path == directory:
                        infos.append(self._info_locked(current))
                        continue
                infos.append(self.load(child.name, child.name))
            except AdapterError as exc:
                if strict:
                    raise
                log.warning("adapter %r not loaded: %s", child.name, exc)
                self.load_errors[child.name] = exc
        return infos

    def load(self, name: str, path: str | os.PathLike, *, replace: bool = False) -> AdapterInfo:
        """Read, validate and bind the adapter at `path` (relative to `adapter_dir`) and serve it as `name`.

        Synchronous: on return its task ids resolve. It stays on the host tier, and on the device tier if a
        slot is free (loading never evicts). AdapterExistsError if `name` or one of its task ids is served
        (a replace may reuse the ids of the version it replaces); nothing changes on any error.
        """
        start = time.perf_counter()
        try:
            with cpu_threads.one_thread():  # called from any thread: it must not get an OpenMP pool for this
                info = self._load(name, path, replace)
        except Exception as exc:
            self._emit([("load", {"adapter": name, "result": "error", "seconds": time.perf_counter() - start,
                                  "tier": "disk", "source": "admin", "from": "disk",
                                  "error": str(exc)})])
            if isinstance(exc, AdapterError):
                raise
            raise AdapterFormatError(f"adapter {name!r} could not be loaded: {exc}") from exc
        self._emit([("load", {"adapter": name, "result": "ok", "seconds": time.perf_counter() - start,
                              "tier": info.residency, "source": "admin", "from": "disk"})])
        return info

    def _load(self, name: str, path: str | os.PathLike, replace: bool) -> AdapterInfo:
        check_name(name)
        directory = self._confine(path)
        with self._lock:
            self._check_name_free_locked(name, replace)  # fail fast, before any I/O; checked again below
        fingerprint = _fingerprint(directory)
        adapter = load_adapter(directory, name)
        bound = self.adapted.bind(adapter)  # the compatibility check; kept if a device slot is free
        routes = routes_of(adapter)
        garbage: list[object] = [bound]  # dropped after the lock is released
        events: list[tuple[str, dict[str, Any]]] = []
        with self._changed:
            self._check_name_free_locked(name, replace)
            taken = self._tasks.conflicts(routes, replacing=name if replace else None)
            if taken:
                task_id, owner = next(iter(taken.items()))
                raise AdapterExistsError(
                    f"task id {task_id!r} of adapter {name!r} is already served by adapter {owner!r}"
                )
            old = self._entries.get(name)
            if old is not None:
                self._retire_locked(old, garbage)
            entry = _Entry(name, directory, fingerprint, adapter.adapter_type,
                           list(adapter.tasks) if adapter.multi_task else [name], adapter.rank,
                           adapter.num_parameters(), adapter.nbytes(), routes,
                           pinned=old is not None and old.pinned)
            self._entries[name] = entry
            self._tasks.add(routes)
            self._add_host_locked(entry, adapter, events, garbage)
            if self._device_used_locked() < self.device_capacity:
                entry.bound = bound
                self._device_lru[name] = entry
            info = self._info_locked(entry)
            self._changed.notify_all()
        self._emit(events)
        return info

    def unload(self, name: str) -> None:
        """Stop serving `name` and its task ids. Leases already taken keep working; once the last one is
        released, the manager holds no reference to the adapter's tensors."""
        garbage: list[object] = []
        with self._changed:
            entry = self._entries.get(name)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
            self._retire_locked(entry, garbage)
            self._changed.notify_all()

    # ------------------------------------------------------------------ lookups
    def resolve(self, task_id: str) -> TaskRoute | None:
        """The adapter and task index serving `task_id`; None for `""` (the base model).
        UnknownTaskError for an id no adapter serves."""
        with self._lock:
            return self._tasks.resolve(task_id)

    def task_routes(self) -> dict[str, TaskRoute]:
        """Every served task id and its route, sorted by task id (for ListTasks)."""
        with self._lock:
            return self._tasks.snapshot()

    def info(self, name: str) -> AdapterInfo:
        with self._lock:
            return self._info_locked(self._get_locked(name))

    def list_adapters(self) -> list[AdapterInfo]:
        with self._lock:
            return [self._info_locked(e) for _, e in sorted(self._entries.items())]

    def residency_counts(self) -> dict[str, int]:
        """{"disk": n, "host": n, "device": n} over the served adapters (for the `loraplex_adapters` gauge)."""
        counts = {"disk": 0, "host": 0, "device": 0}
        with self._lock:
            for entry in self._entries.values():
                counts[entry.residency] += 1
        return counts

    # ------------------------------------------------------------------ serving
    def acquire(self, name: str) -> Lease | None:
        """A lease on `name` if it is on the device tier; otherwise schedule its background load and return
        None (retry next step). Never blocks on I/O. Raises the error of a failed background load (see
        `retry_failed_after`), AdapterNotFoundError for a name not served."""
        with self._lock:
            entry = self._get_locked(name)
            if entry.bound is not None:
                return self._lease_locked(entry)
            error = self._take_error_locked(entry)
            if error is not None:
                raise error
            self._schedule_locked(entry)
            return None

    def wait_resident(self, name: str, timeout: float) -> bool:
        """Block until `name` is on the device tier (scheduling its load); False after `timeout` seconds.
        Raises like `acquire`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                entry = self._get_locked(name)
                if entry.bound is not None:
                    return True
                error = self._take_error_locked(entry)
                if error is not None:
                    raise error
                self._schedule_locked(entry)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)

    def pin(self, name: str) -> None:
        """Never evict `name` (its load is scheduled now). At most device_capacity - 1 adapters are pinned,
        so that the others can still be served; pinning more raises AdapterCapacityError."""
        with self._lock:
            entry = self._get_locked(name)
            if not entry.pinned:
                pinned = sum(e.pinned for e in self._entries.values())
                if pinned + 1 > self.device_capacity - 1:
                    raise AdapterCapacityError(
                        f"cannot pin adapter {name!r}: {pinned} of {self.device_capacity} device slots are pinned, "
                        "and one must stay free for the other adapters"
                    )
                entry.pinned = True
            if entry.bound is None and entry.error is None:
                self._schedule_locked(entry)

    def unpin(self, name: str) -> None:
        with self._lock:
            self._get_locked(name).pinned = False

    def is_pinned(self, name: str) -> bool:
        """Whether `name` is pinned (False for a name not served)."""
        with self._lock:
            entry = self._entries.get(name)
            return entry is not None and entry.pinned

    def close(self) -> None:
        """Stop the worker threads (queued loads are cancelled). Leases keep working."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "AdapterManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals (`_locked`: lock held)
    def _get_locked(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        return entry

    def _check_name_free_locked(self, name: str, replace: bool) -> None:
        if name in self._entries and not replace:
            raise AdapterExistsError(f"adapter {name!r} is already loaded (use replace to swap in a new version)")

    def _info_locked(self, entry: _Entry) -> AdapterInfo:
        return AdapterInfo(entry.name, entry.adapter_type, list(entry.tasks), entry.rank, entry.num_parameters,
                           entry.residency, entry.pinned, entry.nbytes)

    def _lease_locked(self, entry: _Entry) -> Lease:
        assert entry.bound is not None
        entry.leases += 1
        self._device_lru.move_to_end(entry.name)
        if entry.name in self._host_lru:  # always, while device residency implies host residency
            self._host_lru.move_to_end(entry.name)
        return Lease(self, entry, entry.bound)

    def _release(self, lease: Lease) -> None:
        garbage: list[object] = []
        with self._changed:
            entry = lease._entry
            if entry is None:
                return
            garbage.append(lease._bound)
            lease._entry = lease._bound = None
            entry.leases -= 1
            if entry.leases == 0 and entry.retired and entry.bound is not None:
                self._retired_bound.discard(entry)
                garbage.append(entry.bound)
                entry.bound = None
            self._changed.notify_all()  # a slot may have become evictable

    def _retire_locked(self, entry: _Entry, garbage: list[object]) -> None:
        """Take `entry` out of service (unload or replace). Its device copy stays while leased."""
        entry.retired = True
        if self._entries.get(entry.name) is entry:
            del self._entries[entry.name]
            self._tasks.remove(entry.name)
        if self._host_lru.get(entry.name) is entry:
            del self._host_lru[entry.name]
        if self._device_lru.get(entry.name) is entry:
            del self._device_lru[entry.name]
        garbage.append(entry.host)
        entry.host = None
        entry.error = None
        if entry.bound is not None:
            if entry.leases:
                self._retired_bound.add(entry)  # keeps its slot until the last lease ends
            else:
                garbage.append(entry.bound)
                entry.bound = None

    def _device_used_locked(self) -> int:
        return len(self._device_lru) + len(self._retired_bound) + self._reserved

    def _device_victim_locked(self, keep: _Entry | None = None) -> _Entry | None:
        """The least recently used device entry that is neither leased nor pinned."""
        for entry in self._device_lru.values():
            if entry.leases == 0 and not entry.pinned and entry is not keep:
                return entry
        return None

    def _reserve_device_slot_locked(self, entry: _Entry, events: list, garbage: list[object]) -> bool:
        """Hold a device slot for `entry`, evicting the LRU unleased, unpinned adapter if the tier is full."""
        if self._device_used_locked() >= self.device_capacity:
            victim = self._device_victim_locked(keep=entry)
            if victim is None:
                return False
            del self._device_lru[victim.name]
            garbage.append(victim.bound)
            victim.bound = None  # it stays on the host tier
            events.append(("evict", {"adapter": victim.name, "tier": "device"}))
        entry.reserved = True
        self._reserved += 1
        return True

    def _unreserve_locked(self, entry: _Entry) -> None:
        if entry.reserved:
            entry.reserved = False
            self._reserved -= 1

    def _add_host_locked(self, entry: _Entry, adapter: Adapter, events: list, garbage: list[object]) -> None:
        """Put `adapter` on the host tier, evicting LRU host-only adapters past `host_capacity`. Adapters on
        the device, pinned or loading are not evicted: then the tier stays over capacity until they leave."""
        entry.host = adapter
        self._host_lru[entry.name] = entry
        self._host_lru.move_to_end(entry.name)
        excess = len(self._host_lru) - self.host_capacity
        if excess <= 0:
            return
        victims = [e for e in self._host_lru.values()
                   if e is not entry and e.bound is None and not e.pinned and not e.loading][:excess]
        for victim in victims:
            del self._host_lru[victim.name]
            garbage.append(victim.host)
            victim.host = None
            events.append(("evict", {"adapter": victim.name, "tier": "host"}))

    def _take_error_locked(self, entry: _Entry) -> AdapterError | None:
        """The pending background error to raise, or None. Raised at least once, then until it expires."""
        if entry.error is None:
            return None
        if entry.error_raised and time.monotonic() - entry.error_at >= self.retry_failed_after:
            entry.error = None  # expired: the caller schedules a fresh attempt
            return None
        entry.error_raised = True
        return _fresh(entry.error)  # a new object each time: tracebacks never pile up on a shared one

    def _schedule_locked(self, entry: _Entry) -> None:
        """Queue a background load of `entry` unless one is queued already.

        While no device slot can be had (all leased or pinned), a load would stop at the host tier, so it is
        queued only to prefetch into free host room: never to evict another host adapter that may be
        waiting too (that would reread files every step). The caller's next acquire tries again.
        """
        if entry.loading or entry.retired or self._closed:
            return
        slot = self._device_used_locked() < self.device_capacity or self._device_victim_locked(keep=entry) is not None
        if not slot and (entry.host is not None or len(self._host_lru) >= self.host_capacity):
            return
        entry.loading = True
        try:
            self._pool.submit(self._background_load, entry)
        except RuntimeError:  # the pool was shut down by close()
            entry.loading = False

    def _background_load(self, entry: _Entry) -> None:
        """Worker thread: disk -> host (if needed) -> device (if a slot can be had)."""
        start = time.perf_counter()
        events: list[tuple[str, dict[str, Any]]] = []
        garbage: list[object] = []
        tier = origin = "disk"
        error: AdapterError | None = None
        try:
            with self._lock:
                adapter, retired = entry.host, entry.retired
            if retired:
                return
            if adapter is not None:
                origin = "host"
            else:
                adapter = self._read(entry)
            with self._lock:
                if entry.retired:
                    return
                if entry.host is not adapter:
                    self._add_host_locked(entry, adapter, events, garbage)
                tier = "host"
                if not self._reserve_device_slot_locked(entry, events, garbage):
                    return  # every slot is leased or pinned: stay on the host tier
            bound = self.adapted.bind(adapter)
            with self._lock:
                self._unreserve_locked(entry)
                if entry.retired:
                    garbage.append(bound)
                    return
                entry.bound = bound
                self._device_lru[entry.name] = entry
                tier = "device"
        except Exception as exc:  # noqa: BLE001 - any failure becomes the adapter's error, never a crash
            error = exc if isinstance(exc, AdapterError) else \
                AdapterFormatError(f"adapter {entry.name!r} could not be loaded: {type(exc).__name__}: {exc}")
            error = _fresh(error)  # without a traceback, which would keep frames (and tensors) alive
            log.warning("background load of adapter %r failed: %s", entry.name, error)
        finally:
            with self._changed:
                self._unreserve_locked(entry)
                entry.loading = False
                if error is not None and not entry.retired:
                    entry.error, entry.error_at, entry.error_raised = error, time.monotonic(), False
                self._changed.notify_all()
            if not entry.retired or error is not None:
                fields: dict[str, Any] = {"adapter": entry.name, "result": "ok" if error is None else "error",
                                          "seconds": time.perf_counter() - start,
                                          "tier": tier if error is None else "disk", "source": "background",
                                          "from": origin}
                if error is not None:
                    fields["error"] = str(error)
                events.append(("load", fields))
            del garbage
            self._emit(events)

    def _read(self, entry: _Entry) -> Adapter:
        """Read `entry` from disk again, refusing files that are no longer the ones `load` validated.

        Errors name the adapter: the requests that meet them asked for a task id, maybe not the adapter's
        name, and the directory in a bare reading error need not be named after the adapter either."""
        try:
            self._confine(entry.path)  # still inside the adapter directory, symlinks swapped in since included
            fingerprint = _fingerprint(entry.path)
            adapter = load_adapter(entry.path, entry.name)
        except AdapterError as exc:
            raise _naming(exc, entry.name) from None
        found = (adapter.adapter_type, tuple(adapter.tasks if adapter.multi_task else [entry.name]), adapter.rank,
                 adapter.num_parameters())
        if fingerprint != entry.fingerprint or found != entry.signature:
            raise AdapterFormatError(
                f"adapter {entry.name!r} changed on disk since it was loaded; load it again with replace "
                "to serve the new version"
            )
        return adapter

    def _confine(self, path: str | os.PathLike) -> Path:
        """The resolved adapter directory `path`, which must lie inside `adapter_dir` (symlinks followed),
        as must the adapter's files. AdapterPathError naming `path` otherwise."""
        try:
            raw = Path(path)
            if self.adapter_dir is None:
                return raw.resolve()
            directory = (raw if raw.is_absolute() else self.adapter_dir / raw).resolve()
            files = [(directory / CONFIG_FILE).resolve(), (directory / WEIGHTS_FILE).resolve()]
        except (OSError, ValueError, RuntimeError) as exc:  # embedded NUL, symlink loop
            raise AdapterPathError(f"adapter path {str(path)!r} is invalid: {exc}") from None
        if directory == self.adapter_dir or not all(p.is_relative_to(self.adapter_dir) for p in [directory, *files]):
            raise AdapterPathError(f"adapter path {str(path)!r} is outside the adapter directory")
        return directory

    def _emit(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        if self._on_event is None:
            return
        for kind, fields in events:
            try:
                self._on_event(kind, fields)
            except Exception:  # noqa: BLE001 - metrics must never break serving
                log.exception("adapter event callback failed on %s %s", kind, fields)


def _fresh(error: AdapterError) -> AdapterError:
    """A copy of `error` with no traceback, cause or context."""
    try:
        return type(error)(*error.args)
    except TypeError:  # a subclass with its own constructor signature
        return AdapterError(str(error))


def _naming(error: AdapterError, name: str) -> AdapterError:
    """`error`, of the same class where it can be, saying that adapter `name` could not be read again."""
    message = f"adapter {name!r} could not be read again from disk: {error}"
    try:
        return type(error)(message)
    except TypeError:  # a subclass with its own constructor signature
        return AdapterFormatError(message)


def _fingerprint(directory: Path) -> tuple[tuple[int, ...], ...]:
    """(device, inode, size, mtime) of the adapter's two files; () entries for missing ones."""
    stamps = []
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            st = os.stat(directory / name)
            stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            stamps.append(())
    return tuple(stamps)
