"""The asyncio client: the same methods as `Client`, as coroutines, on `grpc.aio`.

    async with AsyncClient("127.0.0.1:50051") as client:
        result = await client.generate("sentiment", "The film was")
        async for chunk in client.generate_stream("sentiment", "The film was"):
            print(chunk.text, end="")
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import grpc.aio

from ._common import ChannelOptions, Stubs, channel_config, generate_request
from .errors import DeadlineExceededError, LoraplexError, from_rpc_error
from .pb import loraplex_pb2 as pb
from .types import AdapterInfo, GenerateResult, StreamChunk, TaskInfo


class AsyncClient:
    """An asyncio connection to one loraplex server. Arguments as for `Client`.

    The channel is opened on first use, inside the running event loop, so the client can be constructed
    anywhere; use it from one event loop only.
    """

    def __init__(
        self,
        target: str,
        token: str | None = None,
        timeout: float | None = None,
        *,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        options: ChannelOptions | None = None,
    ) -> None:
        self._config = channel_config(target, token, timeout, tls, root_certificates, options)
        self._channel: grpc.aio.Channel | None = None
        self._stubs: Stubs | None = None
        self._closed = False

    @property
    def target(self) -> str:
        return self._config.target

    def _open(self) -> Stubs:
        """The stubs, opening the channel on first use."""
        if self._closed:
            raise RuntimeError("AsyncClient is closed")
        if self._stubs is None:
            config = self._config
            if config.credentials is None:
                self._channel = grpc.aio.insecure_channel(config.target, options=config.options)
            else:
                self._channel = grpc.aio.secure_channel(config.target, config.credentials, options=config.options)
            self._stubs = Stubs.for_channel(self._channel)
        return self._stubs

    async def _call(self, method: str, request: object, timeout: float | None,
                    metadata: tuple[tuple[str, str], ...] | None = None) -> Any:
        callable_ = getattr(self._open(), method)
        metadata = self._config.metadata if metadata is None else metadata
        try:
            return await callable_(request, timeout=self._config.timeout_for(timeout), metadata=metadata)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from err

    async def generate(
        self,
        task_id: str,
        prompt: str,
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        ignore_eos: bool = False,
        *,
        timeout: float | None = None,
    ) -> GenerateResult:
        """See `Client.generate`."""
        request = generate_request(task_id, prompt, max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)
        metadata = self._config.generate_metadata(task_id)
        return GenerateResult.from_pb(await self._call("generate", request, timeout, metadata))

    def generate_stream(
        self,
        task_id: str,
        prompt: str,
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        ignore_eos: bool = False,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """See `Client.generate_stream`; use as `async for chunk in client.generate_stream(...)`.

        Call it from a coroutine: the request is sent at once. Leaving the loop early cancels it on the server.
        """
        request = generate_request(task_id, prompt, max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)
        call = self._open().generate_stream(
            request, timeout=self._config.timeout_for(timeout), metadata=self._config.generate_metadata(task_id)
        )
        return _iterate(call)

    async def list_tasks(self, *, timeout: float | None = None) -> list[TaskInfo]:
        """See `Client.list_tasks`."""
        response = await self._call("list_tasks", pb.ListTasksRequest(), timeout)
        return [TaskInfo.from_pb(t) for t in response.tasks]

    async def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        """See `Client.list_adapters`."""
        response = await self._call("list_adapters", pb.ListAdaptersRequest(), timeout)
        return [AdapterInfo.from_pb(a) for a in response.adapters]

    async def load_adapter(
        self, name: str, path: str, replace: bool = False, *, timeout: float | None = None
    ) -> AdapterInfo:
        """See `Client.load_adapter`."""
        request = pb.LoadAdapterRequest(name=name, path=path, replace=replace)
        response = await self._call("load_adapter", request, timeout)
        return AdapterInfo.from_pb(response.adapter)

    async def unload_adapter(self, name: str, *, timeout: float | None = None) -> None:
        """See `Client.unload_adapter`."""
        await self._call("unload_adapter", pb.UnloadAdapterRequest(name=name), timeout)

    async def health_status(self, service: str = "", *, timeout: float | None = None) -> str:
        """See `Client.health_status`."""
        return await self._call("health_check", service, timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> bool:
        """See `Client.health`."""
        return await self.health_status(service, timeout=timeout) == "SERVING"

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.1, service: str = "") -> None:
        """See `Client.wait_ready`."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                message = f"{self.target} {service!r} not SERVING after {timeout}s (last: {last})"
                raise DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, message)
            try:
                last = await self.health_status(service, timeout=max(min(left, 5.0), 0.01))
                if last == "SERVING":
                    return
            except LoraplexError as err:
                last = str(err)
            await asyncio.sleep(min(interval, max(deadline - time.monotonic(), 0)))

    async def close(self) -> None:
        """Close the connection; calls in flight are cancelled."""
        self._closed = True
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stubs = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.target!r})"


async def _iterate(call: grpc.aio.UnaryStreamCall) -> AsyncIterator[StreamChunk]:
    try:
        async for message in call:
            yield StreamChunk.from_pb(message)
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err) from err
    finally:
        call.cancel()  # a no-op once the stream has ended
