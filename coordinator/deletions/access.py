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
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import grpc

from coordinator.deletions.limits import RateLimiter
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


TOKEN_ID_CHARS = 12  # a token's public handle: the start of its sha256


@dataclass(frozen=True)
class TokenEntry:
    """One line of the tokens file, as `lethe api token list` shows it (never the token)."""

    token_id: str
    grant: Grant
    created_at: float | None


def _read_entries(path: Path) -> dict[str, TokenEntry]:
    """The tokens file's entries, by token digest; refused when others could read it."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise TokenFileError(f"cannot read tokens file {path}: {error}") from error
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenFileError(f"tokens file {path} is open to other users; chmod 600 it")
    try:
        entries = {
            str(entry["sha256"]): TokenEntry(
                token_id=str(entry["sha256"])[:TOKEN_ID_CHARS],
                grant=Grant(
                    app=entry["app"],
                    scope=Scope(entry["scope"]),
                    subjects=tuple(entry["subjects"]),
                ),
                created_at=entry.get("created_at"),
            )
            for entry in json.loads(text)["tokens"]
        }
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise TokenFileError(f"tokens file {path} is malformed: {error}") from error
    if not all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in entries):
        raise TokenFileError(f"tokens file {path}: every sha256 must be 64 hex digits")
    return entries


def _write_entries(path: Path, entries: dict[str, TokenEntry]) -> None:
    document = {
        "tokens": [
            {
                "sha256": digest,
                "app": entry.grant.app,
                "scope": entry.grant.scope.value,
                "subjects": list(entry.grant.subjects),
                "created_at": entry.created_at,
            }
            for digest, entry in entries.items()
        ]
    }
    atomic_write_bytes(path, (json.dumps(document, indent=2) + "\n").encode(), mode=0o600)


def load_grants(path: Path) -> dict[str, Grant]:
    """The grants in a tokens file, by token digest."""
    return {digest: entry.grant for digest, entry in _read_entries(path).items()}


def list_tokens(path: Path) -> list[TokenEntry]:
    """The tokens file's entries, oldest first (a missing file lists none)."""
    if not path.exists():
        return []
    return sorted(_read_entries(path).values(), key=lambda entry: entry.created_at or 0.0)


def add_token(path: Path, app: str, scope: Scope, subjects: Sequence[str] = ()) -> str:
    """Make a token for `app`, store its digest in the tokens file, and return the token.

    The token is not stored anywhere: show it to the app's owner once.
    """
    grant = Grant(app=app, scope=Scope(scope), subjects=tuple(subjects))
    token = secrets.token_urlsafe(32)
    digest = token_digest(token)
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(path.parent):
        entries = _read_entries(path) if path.exists() else {}
        entries[digest] = TokenEntry(digest[:TOKEN_ID_CHARS], grant, round(time.time(), 3))
        _write_entries(path, entries)
    return token


def revoke_token(path: Path, token_id: str) -> TokenEntry:
    """Remove the token whose id is `token_id`; a running API refuses it from the next call."""
    if not re.fullmatch(rf"[0-9a-f]{{{TOKEN_ID_CHARS}}}", token_id):
        raise TokenFileError(f"a token id is {TOKEN_ID_CHARS} hex digits, got {token_id!r}")
    with exclusive_lock(path.parent):
        entries = _read_entries(path)
        matches = [digest for digest, entry in entries.items() if entry.token_id == token_id]
        if not matches:
            raise TokenFileError(f"no token with id {token_id} in {path}")
        if len(matches) > 1:  # two digests sharing 48 bits: never seen, but never guess
            raise TokenFileError(f"token id {token_id} is ambiguous; edit {path} by hand")
        revoked = entries.pop(matches[0])
        _write_entries(path, entries)
    return revoked


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
        caller = self.caller(metadata)
        return None if caller is None else caller[1]

    def caller(self, metadata: Iterable[tuple[str, Any]] | None) -> tuple[str, Grant] | None:
        """(token digest, grant) of the bearer token in a call's metadata, or None."""
        sent = str(dict(metadata or ()).get(HEADER, ""))
        if not sent.startswith(_SCHEME):
            return None
        token = sent.removeprefix(_SCHEME)
        grant = self.grant(token)
        return None if grant is None else (token_digest(token), grant)

    def _file_stamp(self) -> tuple[int, ...] | None:
        """What changes when the file is rewritten, replaced or chmod-ed (ctime, mode)."""
        try:
            info = self.path.stat()
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino, info.st_mode)


class AccessInterceptor(grpc.ServerInterceptor):
    """Ends every call to a service outside OPEN_SERVICES with UNAUTHENTICATED unless its
    bearer token is in the registry, and with RESOURCE_EXHAUSTED when the token has spent
    its rate limit, before any handler runs."""

    def __init__(self, registry: TokenRegistry, limiter: RateLimiter) -> None:
        self.registry = registry
        self.limiter = limiter

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").rpartition("/")[0]
        if handler is None or service in OPEN_SERVICES:
            return handler
        caller = self.registry.caller(handler_call_details.invocation_metadata)
        if caller is None:
            return _refusal(
                handler, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token"
            )
        if not self.limiter.allow(caller[0]):
            limit = self.limiter.limit
            return _refusal(
                handler,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"rate limit of this token ({limit.rate:g}/s, bursts of {limit.burst}); "
                "retry later",
            )
        return handler


def _refusal(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as `handler` that refuses the call."""

    def refuse(_request: Any, context: grpc.ServicerContext) -> None:
        context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
