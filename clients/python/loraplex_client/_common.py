"""What the sync and asyncio clients share: channel settings, call metadata and request building."""

from __future__ import annotations

import os
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import grpc
import grpc.aio

from . import _health
from .errors import InvalidArgumentError
from .pb import loraplex_pb2 as pb
from .pb import loraplex_pb2_grpc as pb_grpc

ChannelOptions = Sequence[tuple[str, "str | int"]]

TASK_HEADER = "x-loraplex-task"
"""gRPC metadata key sent with every Generate and GenerateStream call, its value the request's task id.

The server ignores it; an L7 proxy in front of several replicas hashes on it (Envoy's `hash_policy` on this
header with a RING_HASH or MAGLEV cluster), so that requests for one task keep reaching the replica that
already holds its adapter. See docs/operating.md.
"""
# Visible ASCII, which any metadata value may carry; '%' is escaped so that the encoding stays one-to-one, and
# spaces too, as HTTP/2 peers may trim them from the ends of a header value.
_HEADER_SAFE = (string.ascii_letters + string.digits + string.punctuation).replace("%", "")


def task_header_value(task_id: str) -> str:
    """The `x-loraplex-task` value of `task_id`: the id itself when it is visible ASCII without '%',
    otherwise percent-encoded UTF-8 (one value per task id, always a valid metadata value)."""
    return quote(task_id, safe=_HEADER_SAFE)


@dataclass(frozen=True)
class ChannelConfig:
    """How to reach the server; both clients build their channel from this."""

    target: str
    token: str | None
    timeout: float | None
    credentials: grpc.ChannelCredentials | None  # None: plaintext
    options: tuple[tuple[str, str | int], ...]

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the bearer token, when there is one (health checks need none, but it is harmless)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def generate_metadata(self, task_id: str) -> tuple[tuple[str, str], ...]:
        """Metadata of a Generate / GenerateStream call: the token, and the task id for affinity routing."""
        return (*self.metadata, (TASK_HEADER, task_header_value(task_id)))

    def timeout_for(self, timeout: float | None) -> float | None:
        """A call's timeout: its own if given, else the client's default (None: wait forever)."""
        return self.timeout if timeout is None else timeout


@dataclass(frozen=True)
class Stubs:
    """The callables of one channel (sync or asyncio: both have the same shape)."""

    generate: Any
    generate_stream: Any
    list_tasks: Any
    load_adapter: Any
    unload_adapter: Any
    list_adapters: Any
    health_check: Any

    @classmethod
    def for_channel(cls, channel: grpc.Channel | grpc.aio.Channel) -> Stubs:
        generation = pb_grpc.GenerationStub(channel)
        admin = pb_grpc.AdapterAdminStub(channel)
        return cls(
            generate=generation.Generate,
            generate_stream=generation.GenerateStream,
            list_tasks=generation.ListTasks,
            load_adapter=admin.LoadAdapter,
            unload_adapter=admin.UnloadAdapter,
            list_adapters=admin.ListAdapters,
            health_check=channel.unary_unary(
                _health.CHECK_METHOD,
                request_serializer=_health.serialize_request,
                response_deserializer=_health.parse_status,
            ),
        )


def channel_config(
    target: str,
    token: str | None,
    timeout: float | None,
    tls: bool,
    root_certificates: bytes | str | os.PathLike[str] | None,
    options: ChannelOptions | None,
) -> ChannelConfig:
    """Validate the client's arguments. `root_certificates` (PEM bytes, or a path to a PEM file) implies TLS."""
    if not target:
        raise ValueError("target must be 'host:port'")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be positive seconds or None, got {timeout!r}")
    if token is not None and (not token or any(c in token for c in "\r\n")):
        raise ValueError("token must be a non-empty single-line string")
    credentials = None
    if tls or root_certificates is not None:
        pem = root_certificates
        if isinstance(pem, (str, os.PathLike)):
            with open(pem, "rb") as f:
                pem = f.read()
        credentials = grpc.ssl_channel_credentials(root_certificates=pem)
    return ChannelConfig(target, token, timeout, credentials, tuple(options or ()))


def generate_request(
    task_id: str,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: Sequence[str] | str | None,
    ignore_eos: bool,
) -> pb.GenerateRequest:
    """The GenerateRequest message.

    The server checks the values (INVALID_ARGUMENT); here only what protobuf cannot carry is refused
    (a negative `max_new_tokens`, a seed over 64 bits, a non-string), with the same InvalidArgumentError.
    """
    if isinstance(stop, str):
        stop = [stop]
    try:
        params = pb.GenerationParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=list(stop or ()),
            ignore_eos=ignore_eos,
        )
        if seed is not None:
            params.seed = seed
        return pb.GenerateRequest(task_id=task_id, prompt=prompt, params=params)
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, f"bad request (not sent): {err}") from err
