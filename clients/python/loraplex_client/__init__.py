"""Python client for the loraplex multi-adapter inference server.

    from loraplex_client import Client
    with Client("127.0.0.1:50051") as client:
        print(client.generate("sentiment", "The film was", max_new_tokens=16).text)

Depends on grpcio and protobuf only (no torch). The generated gRPC modules are in `loraplex_client.pb`.
"""

from ._common import TASK_HEADER
from .aio import AsyncClient
from .client import Client
from .errors import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LoraplexError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from .types import AdapterInfo, GenerateResult, StreamChunk, TaskInfo

__version__ = "0.1.0"

__all__ = [
    "AdapterInfo",
    "AlreadyExistsError",
    "AsyncClient",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "GenerateResult",
    "InternalError",
    "InvalidArgumentError",
    "LoraplexError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "StreamChunk",
    "TASK_HEADER",
    "TaskInfo",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
]
