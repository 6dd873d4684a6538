"""CPU thread discipline (server/cpu_threads.py): the engine's thread keeps its thread count, helper threads
that touch tensors create no OpenMP pool, and the thread that starts the engine gives its pool back."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch
from tiny import tiny_model
from tokenizer import build_tokenizer

from loraplex.adapters import AdaptedModel
from loraplex.server import cpu_threads
from loraplex.server.engine import Engine, EngineConfig
from loraplex.server.request import SamplingParams

needs_openmp = pytest.mark.skipif(not cpu_threads.uses_openmp(), reason="torch does not run on OpenMP here")


def in_thread(fn):
    """fn() run on a fresh thread (its own OpenMP state), its result returned."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def task_ids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def start_pool() -> set[int]:
    """Run a parallel region on this thread with 2 torch threads, as a model load does; the worker threads it
    started (this thread's OpenMP pool)."""
    torch.set_num_threads(2)
    before = task_ids()
    torch.ones(1 << 22).mul_(2.0)
    return task_ids() - before


@needs_openmp
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/task lists threads on Linux")
def test_release_pool_ends_the_calling_threads_openmp_workers():
    def run() -> tuple[set[int], set[int], bool]:
        workers = start_pool()
        released = cpu_threads.release_pool()
        return workers, task_ids() & workers, released

    workers, left, released = in_thread(run)
    if not released:
        pytest.skip("no libgomp with omp_pause_resource_all in this process")
    assert workers, "the parallel region started no worker thread"
    assert not left, f"worker threads {left} outlived release_pool"


@needs_openmp
def test_one_thread_runs_single_threaded_and_restores():
    def run() -> tuple[int, int]:
        torch.set_num_threads(2)
        with cpu_threads.one_thread():
            inside = torch.get_num_threads()
        return inside, torch.get_num_threads()

    assert in_thread(run) == (1, 2)


@needs_openmp
def test_engine_keeps_the_thread_count_it_was_built_with():
    """torch.set_num_threads on a helper thread changes the default that fresh threads start with; the engine's
    loop must not inherit it, or every step would run on one core."""
    adapted = AdaptedModel(tiny_model("llama"))
    seen: list[int] = []

    class Probe:
        def step(self, record) -> None:
            seen.append(torch.get_num_threads())  # called on the engine's thread

        def request_finished(self, record) -> None:
            pass

    def build() -> Engine:
        torch.set_num_threads(2)
        return Engine(adapted, build_tokenizer(), None, EngineConfig(max_seq_len=32, max_slots=2, observer=Probe()))

    engine = in_thread(build)
    in_thread(lambda: torch.set_num_threads(1))  # a helper thread; fresh threads now start with one
    with engine:
        engine.generate("", [5, 6, 7], SamplingParams(max_new_tokens=2, ignore_eos=True), timeout=30)
    assert seen and set(seen) == {2}


@needs_openmp
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/task lists threads on Linux")
def test_starting_the_engine_ends_the_starting_threads_openmp_workers():
    adapted = AdaptedModel(tiny_model("llama"))

    def run() -> tuple[set[int], set[int]]:
        workers = start_pool()
        with Engine(adapted, build_tokenizer(), None, EngineConfig(max_seq_len=32, max_slots=2)) as engine:
            engine.generate("", [5, 6, 7], SamplingParams(max_new_tokens=2, ignore_eos=True), timeout=30)
            return workers, task_ids() & workers

    if not cpu_threads.release_pool():
        pytest.skip("no libgomp with omp_pause_resource_all in this process")
    workers, left = in_thread(run)
    assert workers and not left


@needs_openmp
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/task lists threads on Linux")
def test_starting_a_background_server_ends_the_callers_openmp_workers():
    """As `loraplex demo` does: train on this thread, then serve from it."""
    from servers import options, start

    def run() -> tuple[set[int], set[int]]:
        workers = start_pool()
        server = start(options())
        try:
            return workers, task_ids() & workers
        finally:
            server.stop(grace=0)

    if not cpu_threads.release_pool():
        pytest.skip("no libgomp with omp_pause_resource_all in this process")
    workers, left = in_thread(run)
    assert workers and not left
