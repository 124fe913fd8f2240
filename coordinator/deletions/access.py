"""Who may call the deletion API, and for which subjects: per-app bearer tokens.

Each token belongs to one app. An `app` token may submit deletions only for
subject ids matching its patterns (fnmatch globs such as `notes:*`: an app
names its own subjects with a prefix) and sees only its own requests; an
`operator` token sees every request and may submit for any subject. The
tokens file (JSON, mode 0600, refused if others could read it) stores only the
sha256 of each token, so a copy of the file lets nobody in; the token itself
is printed once, when it is made. A running server notices a changed file
and reloads it; if the new file is unusable it lets nobody in until fixed.

Health checks are open (a load balancer probes them without credentials, and
they tell only SERVING or not). Everything else, server reflection included,
needs a valid token: reflection gives away no secret, but there is no reason
to show the API's shape to a caller who cannot use it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import grpc

from shared.auth import _SCHEME, HEADER
from shared.durable import atomic_write_bytes, exclusive_lock

log = logging.getLogger(__name__)

APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})


class Scope(StrEnum):
    APP = "app"
    OPERATOR = "operator"


class TokenFileError(ValueError):
    """The tokens file is missing, readable by others, or malformed."""


@dataclass(frozen=True)
class Grant:
    """What one token allows."""

    app: str
    scope: Scope
    subjects: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not APP_NAME.fullmatch(self.app):
            raise TokenFileError(f"app name {self.app!r} must match {APP_NAME.pattern}")
        if self.scope is Scope.APP and not self.subjects:
            raise TokenFileError(f"app {self.app!r} needs at least one subject pattern")
        if self.scope is Scope.OPERATOR and self.subjects:
            raise TokenFileError("an operator token sees every subject; give it no patterns")
        if not all(isinstance(p, str) and p for p in self.subjects):
            raise TokenFileError(f"app {self.app!r}: subject patterns must be non-empty strings")

    def may_submit(self, subject_id: str) -> bool:
        return self.scope is Scope.OPERATOR or any(
            fnmatch.fnmatchcase(subject_id, pattern) for pattern in self.subjects
        )

    def sees(self, app: str) -> bool:
        return self.scope is Scope.OPERATOR or app == self.app

    @property
    def sees_fleet(self) -> bool:
        """Whether answers may carry the fleet's side of a request (node ids, per-device
        salted hashes, edit ids, device errors): for operators only, not for apps."""
        return self.scope is Scope.OPERATOR

    @property
    def listed_app(self) -> str | None:
        """The app whose requests a listing shows (None: all of them)."""
        return None if self.scope is Scope.OPERATOR else self.app


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def load_grants(path: Path) -> dict[str, Grant]:
    """The grants in a tokens file, by token digest."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise TokenFileError(f"cannot read tokens file {path}: {error}") from error
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenFileError(f"tokens file {path} is open to other users; chmod 600 it")
    try:
        entries = json.loads(text)["tokens"]
        grants = {
            str(entry["sha256"]): Grant(
                app=entry["app"], scope=Scope(entry["scope"]), subjects=tuple(entry["subjects"])
            )
            for entry in entries
        }
    except (ValueError, KeyError, TypeError) as error:
        raise TokenFileError(f"tokens file {path} is malformed: {error}") from error
    if not all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in grants):
        raise TokenFileError(f"tokens file {path}: every sha256 must be 64 hex digits")
    return grants


def add_token(path: Path, app: str, scope: Scope, subjects: Sequence[str] = ()) -> str:
    """Make a token for `app`, store its digest in the tokens file, and return the token.

    The token is not stored anywhere: show it to the app's owner once.
    """
    grant = Grant(app=app, scope=Scope(scope), subjects=tuple(subjects))
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(path.parent):
        grants = load_grants(path) if path.exists() else {}
        grants[token_digest(token)] = grant
        document = {
            "tokens": [
                {
                    "sha256": digest,
                    "app": g.app,
                    "scope": g.scope.value,
                    "subjects": list(g.subjects),
                }
                for digest, g in grants.items()
            ]
        }
        atomic_write_bytes(path, (json.dumps(document, indent=2) + "\n").encode(), mode=0o600)
    return token


class TokenRegistry:
    """The grants of a tokens file, reloaded when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._grants = load_grants(path)  # an unusable file at start is the operator's error
        self._stamp = self._file_stamp()

    def grant(self, token: str) -> Grant | None:
        """The grant of `token`, or None. Tokens are looked up by their sha256, so the
        time a lookup takes says nothing about any stored token."""
        with self._lock:
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._grants = load_grants(self.path)
                except TokenFileError as error:
                    log.error("refusing every call until the tokens file is fixed: %s", error)
                    self._grants = {}
            return self._grants.get(token_digest(token))

    def from_metadata(self, metadata: Iterable[tuple[str, Any]] | None) -> Grant | None:
        """The grant of the bearer token in a call's metadata, or None."""
        sent = str(dict(metadata or ()).get(HEADER, ""))
        if not sent.startswith(_SCHEME):
            return None
        return self.grant(sent.removeprefix(_SCHEME))

    def _file_stamp(self) -> tuple[int, ...] | None:
        """What changes when the file is rewritten, replaced or chmod-ed (ctime, mode)."""
        try:
            info = self.path.stat()
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino, info.st_mode)


class AccessInterceptor(grpc.ServerInterceptor):
    """Ends every call to a service outside OPEN_SERVICES with UNAUTHENTICATED unless its
    bearer token is in the registry, before any handler runs."""

    def __init__(self, registry: TokenRegistry) -> None:
        self.registry = registry

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").rpartition("/")[0]
        if handler is None or service in OPEN_SERVICES:
            return handler
        if self.registry.from_metadata(handler_call_details.invocation_metadata) is None:
            return _refusal(handler)
        return handler


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as `handler` that refuses the call."""

    def refuse(_request: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
