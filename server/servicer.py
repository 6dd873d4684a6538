"""The gRPC servicers: a thin translation between `loraplex.v1` messages and the engine / adapter manager.

Known errors become the status codes of CONTRACT.md (see `status_of`), with the engine's or the manager's
short message as details. Anything else propagates to `ErrorInterceptor`, the one last-resort handler,
which logs it and answers INTERNAL. A generation RPC that ends early (client cancel, deadline) cancels its
request in the engine, so that the sequence leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

import grpc
import grpc.aio
from loraplex_client.pb import loraplex_pb2 as pb
from loraplex_client.pb import loraplex_pb2_grpc as pb_grpc

from ..adapters.errors import AdapterError, IncompatibleAdapterError, UnknownTaskError
from .engine import Engine
from .manager import (
    AdapterCapacityError,
    AdapterExistsError,
    AdapterInfo,
    AdapterManager,
    AdapterNotFoundError,
    AdapterPathError,
)
from .metrics import ADAPTER_OVERFLOW, Metrics
from .request import (
    EngineStoppedError,
    FinishReason,
    GenerationResult,
    InvalidRequestError,
    QueueFullError,
    RequestHandle,
    SamplingParams,
    StreamDelta,
)

log = logging.getLogger("loraplex.server")

Code = grpc.StatusCode
MAX_DETAILS = 1024  # bytes of an error message sent to the client (gRPC caps all headers at 8 KiB)
INLINE_PROMPT_CHARS = 4096  # longer prompts are tokenized in a worker thread (a few ms below this)
# A client whose deadline passes cancels the call itself (RST_STREAM), which the server cannot tell from any
# other cancel. The server's copy of the deadline starts when the request arrives, so it ends a little after
# the client's: a cancel this close to it is the deadline (without the slack, streams under load were counted
# CANCELLED with a millisecond left).
DEADLINE_SLACK_S = 0.05

# first match wins: subclasses before their bases (AdapterPathError is an AdapterError, ...)
_SUBMIT_ERRORS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (UnknownTaskError, Code.NOT_FOUND),
    (AdapterNotFoundError, Code.NOT_FOUND),
    (InvalidRequestError, Code.INVALID_ARGUMENT),
    (QueueFullError, Code.RESOURCE_EXHAUSTED),
    (EngineStoppedError, Code.UNAVAILABLE),
    (AdapterExistsError, Code.ALREADY_EXISTS),
    (AdapterPathError, Code.PERMISSION_DENIED),
    (IncompatibleAdapterError, Code.FAILED_PRECONDITION),
    (AdapterCapacityError, Code.RESOURCE_EXHAUSTED),
    (AdapterError, Code.INVALID_ARGUMENT),  # corrupt, pickled, unsupported, invalid name
)
# errors a request meets after it was accepted: its adapter failed to load or was unloaded meanwhile
_RUN_ERRORS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (AdapterNotFoundError, Code.NOT_FOUND),
    (AdapterError, Code.FAILED_PRECONDITION),
)
_FINISH = {FinishReason.LENGTH: pb.FINISH_REASON_LENGTH, FinishReason.EOS: pb.FINISH_REASON_EOS,
           FinishReason.STOP: pb.FINISH_REASON_STOP}
SHUTTING_DOWN = "the server is shutting down"
STARTING = "the server is starting (the model is loading)"


def details_of(text: str) -> str:
    """`text` cut to MAX_DETAILS bytes of UTF-8. gRPC sends the details percent-encoded in a header (3 bytes for
    every byte outside printable ASCII) and replaces a status whose headers pass 8 KiB with RESOURCE_EXHAUSTED:
    a limit in characters is not enough, since 1024 emoji take 12 KiB there."""
    data = text.encode("utf-8", "replace")  # a lone surrogate (an undecodable file name) becomes '?'
    if len(data) <= MAX_DETAILS:
        return data.decode("utf-8")
    return data[:MAX_DETAILS - 16].decode("utf-8", "ignore") + " ... (truncated)"


def status_of(exc: BaseException, table=_SUBMIT_ERRORS) -> tuple[grpc.StatusCode, str] | None:
    """(code, short details) for a known error; None for anything else (a bug: INTERNAL)."""
    for kind, code in table:
        if isinstance(exc, kind):
            return code, details_of(str(exc) or type(exc).__name__)
    return None


@dataclass
class Backend:
    """What the servicers serve through, once the model is loaded."""

    engine: Engine
    manager: AdapterManager
    metrics: Metrics | None = None
    admin_enabled: bool = True  # False without an adapter directory: LoadAdapter has nowhere to read from


class ServingState:
    """Shared by the servicers and the server: the backend (None while starting) and whether it drains."""

    def __init__(self) -> None:
        self.backend: Backend | None = None
        self.draining = False

    async def require(self, context: grpc.aio.ServicerContext) -> Backend:
        """The backend, or abort UNAVAILABLE while starting or shutting down."""
        if self.draining:
            await context.abort(Code.UNAVAILABLE, SHUTTING_DOWN)
        if self.backend is None:
            await context.abort(Code.UNAVAILABLE, STARTING)
        return self.backend


def sampling_params(params: pb.GenerationParams) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=params.max_new_tokens or None,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=params.seed if params.HasField("seed") else None,
        stop=list(params.stop),
        ignore_eos=params.ignore_eos,
    )


def adapter_info(info: AdapterInfo) -> pb.AdapterInfo:
    return pb.AdapterInfo(name=info.name, adapter_type=info.adapter_type, tasks=info.tasks, rank=info.rank,
                          num_parameters=info.num_parameters, residency=info.residency,
                          nbytes=info.nbytes)


class _RequestRecord:
    """Times one generation RPC and reports it to the metrics once, whatever its outcome."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self.start = time.perf_counter()
        self.adapter = ADAPTER_OVERFLOW  # until the task resolves: unknown task ids share one label value
        self.ttft: float | None = None
        self.prompt_tokens = 0
        self.generated = 0
        self.code = Code.INTERNAL
        self._reported = False

    def label(self, backend: Backend, task_id: str) -> None:
        try:
            route = backend.manager.resolve(task_id)
        except UnknownTaskError:
            return
        self.adapter = route.adapter if route is not None else ""

    def accepted(self, handle: RequestHandle) -> None:
        self.adapter, self.prompt_tokens = handle.adapter, handle.prompt_tokens

    def delta(self, delta: StreamDelta) -> None:
        if delta.token_ids:
            self.generated += len(delta.token_ids)
            if self.ttft is None:
                self.ttft = time.perf_counter() - self.start

    def cancelled(self, context: grpc.aio.ServicerContext) -> None:
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= DEADLINE_SLACK_S
        self.code = Code.DEADLINE_EXCEEDED if expired else Code.CANCELLED

    def report(self) -> None:
        """Count the RPC, once: where it aborts, before the status goes out (a client that scrapes right after
        its error must find it counted), else when the RPC ends."""
        if self.metrics is not None and not self._reported:
            self._reported = True
            self.metrics.request_finished(self.adapter, self.code, time.perf_counter() - self.start, self.ttft,
                                          self.prompt_tokens, self.generated)


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, state: ServingState) -> None:
        self.state = state

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        backend = await self.state.require(context)
        record = _RequestRecord(backend.metrics)
        handle: RequestHandle | None = None
        try:
            handle = await _submit(backend, request, context, record)
            async for delta in handle.aiter():
                record.delta(delta)
            result = handle.result(timeout=0)
            await _check_not_cancelled(result, context, record)
            record.code = Code.OK
            return pb.GenerateResponse(text=result.text, token_ids=result.token_ids,
                                       finish_reason=_FINISH[result.finish_reason],
                                       prompt_tokens=result.prompt_tokens, generated_tokens=result.generated_tokens,
                                       adapter=result.adapter)
        except asyncio.CancelledError:
            record.cancelled(context)
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_known(exc, context, record, _RUN_ERRORS)
            raise
        finally:
            _leave(handle, record)

    async def GenerateStream(self, request: pb.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateStreamResponse]:
        backend = await self.state.require(context)
        record = _RequestRecord(backend.metrics)
        handle: RequestHandle | None = None
        try:
            handle = await _submit(backend, request, context, record)
            async for delta in handle.aiter():
                record.delta(delta)
                if delta.finish_reason is None:
                    yield pb.GenerateStreamResponse(text=delta.text, token_ids=delta.token_ids)
                elif delta.finish_reason != FinishReason.CANCELLED:
                    yield pb.GenerateStreamResponse(
                        text=delta.text, token_ids=delta.token_ids, finish_reason=_FINISH[delta.finish_reason],
                        prompt_tokens=handle.prompt_tokens, generated_tokens=record.generated,
                        adapter=handle.adapter)
            await _check_not_cancelled(handle.result(timeout=0), context, record)
            record.code = Code.OK
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: closed while waiting to send
            record.cancelled(context)
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_known(exc, context, record, _RUN_ERRORS)
            raise
        finally:
            _leave(handle, record)

    async def ListTasks(self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext) -> pb.ListTasksResponse:
        backend = await self.state.require(context)
        types = {info.name: info.adapter_type for info in backend.manager.list_adapters()}
        return pb.ListTasksResponse(tasks=[pb.TaskInfo(task_id=task_id, adapter=route.adapter,
                                                       adapter_type=types.get(route.adapter, ""))
                                           for task_id, route in backend.manager.task_routes().items()])


class AdapterAdminServicer(pb_grpc.AdapterAdminServicer):
    def __init__(self, state: ServingState) -> None:
        self.state = state

    async def LoadAdapter(self, request: pb.LoadAdapterRequest,
                          context: grpc.aio.ServicerContext) -> pb.LoadAdapterResponse:
        backend = await self.state.require(context)
        if not backend.admin_enabled:
            await context.abort(Code.FAILED_PRECONDITION, "the server was started without --adapter-dir")
        name = request.name or PurePosixPath(request.path).name  # default: the directory's name
        replaced = request.replace and any(info.name == name for info in backend.manager.list_adapters())
        try:  # reading and binding take a while: off the event loop
            info = await asyncio.to_thread(backend.manager.load, name, request.path, replace=request.replace)
        except Exception as exc:
            await _abort_known(exc, context)
            raise
        _refresh_adapter_gauge(backend)
        log.info("adapter %r loaded from %r (%s, %s)%s", name, request.path, info.adapter_type, info.residency,
                 " replacing the previous version" if replaced else "")
        return pb.LoadAdapterResponse(adapter=adapter_info(info), replaced=replaced)

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest,
                            context: grpc.aio.ServicerContext) -> pb.UnloadAdapterResponse:
        backend = await self.state.require(context)
        try:
            backend.manager.unload(request.name)
        except Exception as exc:
            await _abort_known(exc, context)
            raise
        _refresh_adapter_gauge(backend)
        log.info("adapter %r unloaded", request.name)
        return pb.UnloadAdapterResponse()

    async def ListAdapters(self, request: pb.ListAdaptersRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListAdaptersResponse:
        backend = await self.state.require(context)
        return pb.ListAdaptersResponse(adapters=[adapter_info(i) for i in backend.manager.list_adapters()])


async def _submit(backend: Backend, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                  record: _RequestRecord) -> RequestHandle:
    """Queue the request in the engine (validation and tokenizing happen here). A long prompt is tokenized in a
    worker thread first: megabytes take seconds, which on the event loop would stall every other RPC."""
    prompt: str | list[int] = request.prompt
    try:
        if len(prompt) > INLINE_PROMPT_CHARS:
            prompt = await asyncio.to_thread(backend.engine.tokenize, prompt)
        handle = backend.engine.submit(request.task_id, prompt, sampling_params(request.params))
    except Exception as exc:
        record.label(backend, request.task_id)
        await _abort_known(exc, context, record)
        raise
    record.accepted(handle)
    return handle


def _leave(handle: RequestHandle | None, record: _RequestRecord) -> None:
    """An RPC that ends before its request (client cancel, deadline, a failed write) cancels the request in
    the engine, which frees its batch slot at the next step; then the RPC is counted."""
    if handle is not None and not handle.done:
        handle.cancel()
    record.report()


async def _check_not_cancelled(result: GenerationResult, context: grpc.aio.ServicerContext,
                               record: _RequestRecord) -> None:
    """The engine cancels requests itself only when it stops before they finish."""
    if result.finish_reason == FinishReason.CANCELLED:
        record.code = Code.UNAVAILABLE
        record.report()
        await context.abort(Code.UNAVAILABLE, f"{SHUTTING_DOWN}: the request was cancelled before it finished")


async def _abort_known(exc: BaseException, context: grpc.aio.ServicerContext, record: _RequestRecord | None = None,
                       table=_SUBMIT_ERRORS) -> None:
    """Abort with the code of a known error; return (so that the caller re-raises) for anything else."""
    status = status_of(exc, table)
    if record is not None:
        record.code = status[0] if status is not None else Code.INTERNAL
    if status is not None:
        if record is not None:
            record.report()
        await context.abort(*status)


def _refresh_adapter_gauge(backend: Backend) -> None:
    if backend.metrics is not None:
        backend.metrics.set_adapters(backend.manager.residency_counts())


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """The last resort around every unary and server-streaming handler: an unexpected exception is logged with
    its traceback and answered INTERNAL, and the server goes on serving. A request that does not parse (e.g. a
    prompt that is not valid UTF-8) is answered INVALID_ARGUMENT rather than grpc's UNKNOWN."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        parse = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None and inspect.iscoroutinefunction(handler.unary_unary):
            return handler._replace(unary_unary=_guard_unary(handler.unary_unary, method), request_deserializer=parse)
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return handler._replace(unary_stream=_guard_stream(handler.unary_stream, method),
                                    request_deserializer=parse)
        return handler


class _Unparsable:
    def __init__(self, error: Exception) -> None:
        self.details = details_of(f"the request is not a valid message: {error}")


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, bad UTF-8 in a string field
            return _Unparsable(exc)

    return parse


def _internal(method: str, exc: Exception) -> str:
    log.error("unexpected error in %s", method, exc_info=exc)
    return details_of(f"internal error: {type(exc).__name__}: {exc}")


def _guard_unary(behaviour, method: str):
    async def guarded(request, context: grpc.aio.ServicerContext):
        if isinstance(request, _Unparsable):
            await context.abort(Code.INVALID_ARGUMENT, request.details)
        try:
            return await behaviour(request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - the last resort
            await context.abort(Code.INTERNAL, _internal(method, exc))

    return guarded


def _guard_stream(behaviour, method: str):
    async def guarded(request, context: grpc.aio.ServicerContext):
        if isinstance(request, _Unparsable):
            await context.abort(Code.INVALID_ARGUMENT, request.details)
        try:
            async with contextlib.aclosing(behaviour(request, context)) as messages:  # closed with this one
                async for message in messages:
                    yield message
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - the last resort
            await context.abort(Code.INTERNAL, _internal(method, exc))

    return guarded


__all__ = ["AdapterAdminServicer", "Backend", "ErrorInterceptor", "GenerationServicer", "ServingState",
           "status_of"]
