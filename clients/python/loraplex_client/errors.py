"""Errors: every failed RPC surfaces as a `LoraplexError` subclass that keeps the gRPC status code.

    try:
        client.generate("no-such-task", "Hi")
    except NotFoundError as err:
        print(err.code, err.details)   # StatusCode.NOT_FOUND  unknown task_id 'no-such-task' ...

The subclasses also derive from the matching built-in exception where there is one (`NotFoundError` is a
`LookupError`, `InvalidArgumentError` a `ValueError`, `DeadlineExceededError` a `TimeoutError`,
`PermissionDeniedError` a `PermissionError`), so generic handlers keep working.
"""

from __future__ import annotations

import grpc


class LoraplexError(Exception):
    """A request to the loraplex server failed. `code` is the gRPC status code, `details` the server's text."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self.code = code
        self.details = details
        super().__init__(f"{code.name}: {details}" if details else code.name)


class CancelledError(LoraplexError):
    """CANCELLED: the call was cancelled (by the client, or the server shutting down)."""


class InvalidArgumentError(LoraplexError, ValueError):
    """INVALID_ARGUMENT: bad generation parameters, a prompt too long, or an invalid adapter."""


class DeadlineExceededError(LoraplexError, TimeoutError):
    """DEADLINE_EXCEEDED: the call's timeout passed before the server answered."""


class NotFoundError(LoraplexError, LookupError):
    """NOT_FOUND: unknown task id or adapter name."""


class AlreadyExistsError(LoraplexError):
    """ALREADY_EXISTS: an adapter of that name (or serving one of its task ids) is loaded; pass replace=True."""


class PermissionDeniedError(LoraplexError, PermissionError):
    """PERMISSION_DENIED: e.g. an adapter path outside the server's adapter directory."""


class ResourceExhaustedError(LoraplexError):
    """RESOURCE_EXHAUSTED: the server's queue is full; retry later."""


class FailedPreconditionError(LoraplexError):
    """FAILED_PRECONDITION: e.g. an adapter that does not fit the server's base model."""


class UnimplementedError(LoraplexError):
    """UNIMPLEMENTED: the server does not have this RPC (an older server?)."""


class InternalError(LoraplexError):
    """INTERNAL: the server failed; the details say how."""


class UnavailableError(LoraplexError):
    """UNAVAILABLE: the server cannot be reached (down, starting, or the address is wrong)."""


class UnauthenticatedError(LoraplexError):
    """UNAUTHENTICATED: missing or wrong token (pass token=... to the client)."""


ERRORS_BY_CODE: dict[grpc.StatusCode, type[LoraplexError]] = {
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


def from_rpc_error(err: grpc.RpcError) -> LoraplexError:
    """The `LoraplexError` for a failed call (sync `grpc.RpcError` or asyncio `grpc.aio.AioRpcError`).

    Codes without a subclass of their own (UNKNOWN, ABORTED, OUT_OF_RANGE, DATA_LOSS) give `LoraplexError`.
    """
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = (details_fn() if callable(details_fn) else None) or ""
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return ERRORS_BY_CODE.get(code, LoraplexError)(code, details)
