"""The task registry: task id -> (adapter name, task index), the lookup every request makes first.

CONTRACT.md: a single-task adapter `N` serves task id `N`; a multi-task adapter `N` with tasks `t1, t2`
serves `t1`, `t2`, `N/t1` and `N/t2`. Task ids are unique on a server. Not thread-safe on its own: the
adapter manager calls it under its lock.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..adapters import Adapter
from ..adapters.errors import UnknownTaskError, shorten


@dataclass(frozen=True)
class TaskRoute:
    """Where a task id is served: the adapter (by name) and the index of the task in that adapter."""

    adapter: str
    task_index: int


def routes_of(adapter: Adapter) -> dict[str, TaskRoute]:
    """Every task id `adapter` serves under its current name, in `Adapter.task_ids()` order."""
    prefix = f"{adapter.name}/"
    routes: dict[str, TaskRoute] = {}
    for task_id in adapter.task_ids():
        # `N/t` names task t; task names never hold '/', so the prefix is unambiguous
        task = task_id[len(prefix):] if adapter.multi_task and task_id.startswith(prefix) else task_id
        routes[task_id] = TaskRoute(adapter.name, adapter.task_index(task))
    return routes


class TaskTable:
    """The task ids served right now. Adding refuses nothing itself: callers check `conflicts` first."""

    def __init__(self) -> None:
        self._routes: dict[str, TaskRoute] = {}

    def conflicts(self, routes: dict[str, TaskRoute], replacing: str | None = None) -> dict[str, str]:
        """{task id: adapter serving it} for each id in `routes` already served by another adapter.
        Ids of adapter `replacing` do not count: a replace frees them."""
        taken = {}
        for task_id in routes:
            current = self._routes.get(task_id)
            if current is not None and current.adapter != replacing:
                taken[task_id] = current.adapter
        return taken

    def add(self, routes: dict[str, TaskRoute]) -> None:
        self._routes.update(routes)

    def remove(self, adapter: str) -> None:
        """Drop every task id served by `adapter`."""
        self._routes = {task_id: r for task_id, r in self._routes.items() if r.adapter != adapter}

    def resolve(self, task_id: str) -> TaskRoute | None:
        """`""` -> None (the base model); an unknown id -> UnknownTaskError naming it."""
        if task_id == "":
            return None
        route = self._routes.get(task_id)
        if route is None:
            raise UnknownTaskError(f"unknown task id {shorten(task_id, 200)!r}")
        return route

    def snapshot(self) -> dict[str, TaskRoute]:
        """A copy of the table, sorted by task id."""
        return dict(sorted(self._routes.items()))
