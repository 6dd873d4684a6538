"""What a caller hands the engine and what it gets back: parameters, handles, results, errors, metrics hooks.

Everything here is plain Python and thread-safe where it is shared: the engine thread publishes deltas into a
`RequestHandle`; callers read them from any thread (`for delta in handle`) or from an asyncio loop
(`async for delta in handle.aiter()`), and `result()` blocks until the request ends.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Protocol


class FinishReason:
    """Why a request ended (the strings are what `GenerationResult.finish_reason` holds)."""

    LENGTH = "length"  # max_new_tokens reached
    EOS = "eos"  # the model produced an end-of-sequence token (and ignore_eos was off)
    STOP = "stop"  # a stop string appeared; the text ends just before it
    CANCELLED = "cancelled"  # handle.cancel(), or the engine stopped before the request finished


# ---- errors raised synchronously by `Engine.submit` (the gRPC layer maps them to status codes) ----
class InvalidRequestError(ValueError):
    """A parameter or the prompt is not acceptable; the message names the parameter (INVALID_ARGUMENT)."""


class QueueFullError(RuntimeError):
    """`max_queued_requests` requests are already waiting (RESOURCE_EXHAUSTED)."""


class EngineStoppedError(RuntimeError):
    """The engine is not running (not started yet, or stopping): the request was not accepted."""


@dataclass
class SamplingParams:
    """How one request generates. Defaults follow CONTRACT.md `GenerationParams` (0 means off / default).

    max_new_tokens: 0 or None = the engine's default (capped so that prompt + output fit the context).
    temperature: 0 = greedy; top_p: 0 (or 1) = off; top_k: 0 = off; seed: same seed -> same output,
    whatever else shares the batch. stop: strings that end the request (the text stops just before one).
    ignore_eos: EOS does not end the request, which then runs to max_new_tokens.
    """

    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass(frozen=True)
class StreamDelta:
    """What is new since the previous delta. `finish_reason` is None on every delta but the last."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]  # generated tokens only (an EOS the model produced is included; its text is not)
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    adapter: str  # the adapter that served the request, "" for the base model


# ---- metrics hook ----
@dataclass(frozen=True)
class RequestRecord:
    """One finished request, as reported to `EngineObserver.request_finished`.

    outcome: a FinishReason value, or "error" when the request failed (adapter load failure, engine fault).
    duration_s: submit -> last token. ttft_s: submit -> first generated token (None if none was generated).
    queue_s: submit -> admission into the running batch (None if never admitted).
    """

    adapter: str
    task_id: str
    outcome: str
    duration_s: float
    ttft_s: float | None
    queue_s: float | None
    prompt_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class StepRecord:
    """One engine step, as reported to `EngineObserver.step`.

    batch_size: sequences in the forward pass; prefill_tokens: prompt tokens processed in it;
    queue_depth / running: after the step; duration_s: wall time of the step (forward + sampling + output).
    """

    batch_size: int
    prefill_tokens: int
    queue_depth: int
    running: int
    duration_s: float


class EngineObserver(Protocol):
    """Optional metrics callback (e.g. the Prometheus exporter). Called on the engine thread: keep it cheap
    and non-blocking; an exception it raises is logged and otherwise ignored."""

    def request_finished(self, record: RequestRecord) -> None: ...

    def step(self, record: StepRecord) -> None: ...


# ---- the caller's side of one request ----
_DONE = object()


class RequestHandle:
    """A submitted request. Stream it, wait for its result, or cancel it; safe to use from any thread."""

    def __init__(self, request_id: int, task_id: str, adapter: str, prompt_tokens: int) -> None:
        self.request_id = request_id
        self.task_id = task_id
        self.adapter = adapter
        self.prompt_tokens = prompt_tokens
        self._lock = threading.Condition()
        self._deltas: list[StreamDelta] = []
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._done = False
        self._cancelled = False
        self._async_sinks: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._wake_engine = lambda: None  # set by the engine: a cancel wakes an idle loop

    # ---- caller API ----
    def cancel(self) -> None:
        """Ask the engine to end the request; it leaves the batch at the next step (finish "cancelled")."""
        with self._lock:
            if self._done:
                return
            self._cancelled = True
        self._wake_engine()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def done(self) -> bool:
        return self._done

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request ends. Raises TimeoutError after `timeout` seconds, or the request's error."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
            if self._error is not None:
                raise self._error
            assert self._result is not None
            return self._result

    def __iter__(self) -> Iterator[StreamDelta]:
        return self.stream()

    def stream(self, timeout: float | None = None) -> Iterator[StreamDelta]:
        """Yield deltas as they come (from the first one, even if some were produced before the call).
        `timeout` bounds each wait for the next delta (TimeoutError); the request's error is raised at the end."""
        index = 0
        while True:
            with self._lock:
                if not self._lock.wait_for(lambda: index < len(self._deltas) or self._done, timeout):
                    raise TimeoutError(f"request {self.request_id}: no output within {timeout} s")
                pending = self._deltas[index:]
                index = len(self._deltas)
                finished, error = self._done, self._error
            yield from pending
            if finished and index == len(self._deltas):
                if error is not None:
                    raise error
                return

    async def aiter(self) -> AsyncIterator[StreamDelta]:
        """Async iteration on the running loop: the engine thread hands deltas over by call_soon_threadsafe."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        sink = (loop, queue)
        with self._lock:  # replay what exists, then subscribe, atomically w.r.t. the engine thread
            for delta in self._deltas:
                queue.put_nowait(delta)
            if self._done:
                queue.put_nowait(_DONE)
            else:
                self._async_sinks.append(sink)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    if self._error is not None:
                        raise self._error
                    return
                yield item
        finally:
            with self._lock:
                if sink in self._async_sinks:
                    self._async_sinks.remove(sink)

    # ---- engine side ----
    def _push(self, delta: StreamDelta) -> None:
        with self._lock:
            self._deltas.append(delta)
            self._lock.notify_all()
            sinks = list(self._async_sinks)
        _post(sinks, delta)

    def _finish(self, result: GenerationResult | None, error: BaseException | None = None) -> None:
        with self._lock:
            if self._done:
                return
            self._result, self._error, self._done = result, error, True
            self._lock.notify_all()
            sinks, self._async_sinks = self._async_sinks, []
        _post(sinks, _DONE)


def _post(sinks: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]], item: object) -> None:
    for loop, queue in sinks:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass


def now() -> float:
    return time.perf_counter()
