"""Optional bearer-token authentication: every RPC needs the token (reflection too), except health checks.

Clients send the gRPC metadata `authorization: Bearer TOKEN`. The token is compared in constant time (on
SHA-256 digests, so that not even its length leaks). A refused call is answered UNAUTHENTICATED before its
request is parsed or any servicer code runs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable

import grpc
import grpc.aio

AUTH_ENV = "LORAPLEX_AUTH_TOKEN"
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)  # load balancers and orchestrators probe without credentials
REFUSED = "missing or wrong credentials: send the metadata 'authorization: Bearer TOKEN'"


def token_from(flag: str | None) -> str | None:
    """The token from `--auth-token`, else from $LORAPLEX_AUTH_TOKEN; None (auth off) when neither is set."""
    token = flag if flag is not None else os.environ.get(AUTH_ENV)
    if token is None or token == "":
        return None
    if token != token.strip() or any(c in token for c in "\r\n"):
        raise ValueError("the auth token must be a single line without surrounding spaces")
    return token


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call outside `OPEN_PREFIXES` that lacks the right bearer token."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("AuthInterceptor needs a non-empty token")
        self._expected = _digest(token)

    def authorized(self, metadata: grpc.aio.Metadata | tuple | None) -> bool:
        presented = None
        for key, value in metadata or ():
            if key == "authorization":
                presented = value.decode("latin-1") if isinstance(value, bytes) else value
                break
        if presented is None:
            return False
        scheme, _, token = presented.partition(" ")
        # always run the comparison, so that timing does not tell a wrong scheme from a wrong token
        match = hmac.compare_digest(_digest(token.strip()), self._expected)
        return match and scheme.lower() == "bearer"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        if self.authorized(handler_call_details.invocation_metadata):
            return handler
        return refusing_handler(handler, grpc.StatusCode.UNAUTHENTICATED, REFUSED)


def refusing_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails every call with `code` without parsing the request."""

    async def unary_response(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    async def stream_response(request: object, context: grpc.aio.ServicerContext):
        await context.abort(code, details)
        yield  # pragma: no cover - abort raises

    behaviour = stream_response if handler.response_streaming else unary_response
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    # no request_deserializer: the raw bytes of an unauthenticated caller are never parsed
    return factory(behaviour, request_deserializer=None, response_serializer=handler.response_serializer)


__all__ = ["AUTH_ENV", "AuthInterceptor", "OPEN_PREFIXES", "refusing_handler", "token_from"]
