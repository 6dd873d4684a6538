"""The blocking client.

    with Client("127.0.0.1:50051", token="secret", timeout=30) as client:
        print(client.generate("sentiment", "The film was", max_new_tokens=16).text)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from ._common import ChannelOptions, Stubs, channel_config, generate_request
from .errors import DeadlineExceededError, LoraplexError, from_rpc_error
from .pb import loraplex_pb2 as pb
from .types import AdapterInfo, GenerateResult, StreamChunk, TaskInfo


class Client:
    """A connection to one loraplex server.

    Args:
        target: "host:port".
        token: sent as `authorization: Bearer TOKEN` on every call (servers started with `--auth-token`).
        timeout: default seconds for every call; None waits forever. Each method's `timeout` overrides it.
        tls: use TLS with the system's root certificates.
        root_certificates: PEM bytes, or the path of a PEM file, to verify the server with (implies TLS).
        options: extra gRPC channel options, e.g. `[("grpc.ssl_target_name_override", "localhost")]`.

    Every failed call raises a `LoraplexError` subclass (`NotFoundError`, ...) that keeps the status code.
    `generate` and `generate_stream` also send the task id as the metadata `x-loraplex-task` (`TASK_HEADER`),
    for a load balancer that routes each task to the same replica.
    The client is thread-safe; close it (or use `with`) to release the connection.
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
        if self._config.credentials is None:
            self._channel = grpc.insecure_channel(target, options=self._config.options)
        else:
            self._channel = grpc.secure_channel(target, self._config.credentials, options=self._config.options)
        self._stubs = Stubs.for_channel(self._channel)

    @property
    def target(self) -> str:
        return self._config.target

    def _call(self, method: Any, request: object, timeout: float | None,
              metadata: tuple[tuple[str, str], ...] | None = None) -> Any:
        metadata = self._config.metadata if metadata is None else metadata
        try:
            return method(request, timeout=self._config.timeout_for(timeout), metadata=metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def generate(
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
        """Generate a completion of `prompt` through task `task_id` ("" = the base model).

        `max_new_tokens=0` takes the server's default; `temperature=0` is greedy; `top_p=0` and `top_k=0`
        are off; `seed` makes sampling repeatable; `stop` strings end generation (and are not returned);
        `ignore_eos` runs to `max_new_tokens` even past the end-of-sequence token.
        """
        request = generate_request(task_id, prompt, max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)
        metadata = self._config.generate_metadata(task_id)
        return GenerateResult.from_pb(self._call(self._stubs.generate, request, timeout, metadata))

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
    ) -> Iterator[StreamChunk]:
        """Like `generate`, but yields chunks as tokens are produced; the last chunk has a `finish_reason`.

        The request is sent at once. Leaving the loop early (or closing the iterator) cancels it on the server.
        `timeout` bounds the whole stream.
        """
        request = generate_request(task_id, prompt, max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)
        call = self._stubs.generate_stream(
            request, timeout=self._config.timeout_for(timeout), metadata=self._config.generate_metadata(task_id)
        )
        return _iterate(call)

    def list_tasks(self, *, timeout: float | None = None) -> list[TaskInfo]:
        """Every task id the server answers to."""
        response = self._call(self._stubs.list_tasks, pb.ListTasksRequest(), timeout)
        return [TaskInfo.from_pb(t) for t in response.tasks]

    def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        """Every adapter the server knows, with its residency ("disk", "host" or "device")."""
        response = self._call(self._stubs.list_adapters, pb.ListAdaptersRequest(), timeout)
        return [AdapterInfo.from_pb(a) for a in response.adapters]

    def load_adapter(self, name: str, path: str, replace: bool = False, *, timeout: float | None = None) -> AdapterInfo:
        """Load the adapter directory `path` (relative to the server's adapter directory) under `name`.

        With `replace=True` an adapter already loaded under `name` is swapped without failing requests in flight;
        without it, a name or task id already served raises AlreadyExistsError.
        """
        request = pb.LoadAdapterRequest(name=name, path=path, replace=replace)
        response = self._call(self._stubs.load_adapter, request, timeout)
        return AdapterInfo.from_pb(response.adapter)

    def unload_adapter(self, name: str, *, timeout: float | None = None) -> None:
        """Stop serving adapter `name` (NotFoundError if unknown)."""
        self._call(self._stubs.unload_adapter, pb.UnloadAdapterRequest(name=name), timeout)

    def health_status(self, service: str = "", *, timeout: float | None = None) -> str:
        """The standard gRPC health status: "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN"."""
        return self._call(self._stubs.health_check, service, timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> bool:
        """True when the server reports SERVING (model loaded and warmed up).

        A server that cannot be reached raises UnavailableError; use `wait_ready` to wait for one that is starting.
        """
        return self.health_status(service, timeout=timeout) == "SERVING"

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.1, service: str = "") -> None:
        """Block until the server reports SERVING; DeadlineExceededError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last: str = "no answer"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                message = f"{self.target} {service!r} not SERVING after {timeout}s (last: {last})"
                raise DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, message)
            try:
                last = self.health_status(service, timeout=max(min(left, 5.0), 0.01))
                if last == "SERVING":
                    return
            except LoraplexError as err:
                last = str(err)
            time.sleep(min(interval, max(deadline - time.monotonic(), 0)))

    def close(self) -> None:
        """Close the connection; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"


def _iterate(call: Iterator[pb.GenerateStreamResponse]) -> Iterator[StreamChunk]:
    try:
        for message in call:
            yield StreamChunk.from_pb(message)
    except grpc.RpcError as err:
        raise from_rpc_error(err) from err
    finally:
        call.cancel()  # a no-op once the stream has ended
