"""Who may call a Lethe gRPC service: a bearer token, checked on every call.

Local services (the device daemon's socket) keep their token in a 0600 file
beside the socket, so only the device's own user can read it; the ClientApp
and local apps send it as `authorization: Bearer <token>`. A call without the
right token ends with UNAUTHENTICATED before any handler runs.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from shared.durable import atomic_write_bytes

HEADER = "authorization"
_SCHEME = "Bearer "


def ensure_token(path: Path) -> str:
    """The token stored at `path`, created (256 random bits, mode 0600) when missing."""
    if path.exists():
        token = path.read_text(encoding="ascii").strip()
        if len(token) < 32:
            raise ValueError(f"token file {path} holds no usable token; remove it to make one")
        return token
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, token.encode("ascii"), mode=0o600)
    return token


def bearer_metadata(token: str) -> tuple[tuple[str, str]]:
    return ((HEADER, _SCHEME + token),)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call whose bearer token is not `token` (compared in constant time)."""

    def __init__(self, token: str) -> None:
        self._expected = (_SCHEME + token).encode()

        def refuse(_request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._refusal = grpc.unary_unary_rpc_method_handler(refuse)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        sent = dict(handler_call_details.invocation_metadata or ()).get(HEADER, "")
        if hmac.compare_digest(str(sent).encode(), self._expected):
            return continuation(handler_call_details)
        return self._refusal
