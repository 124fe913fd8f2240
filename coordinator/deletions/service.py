"""The deletion-request API over gRPC (`lethe.v1.DeletionService`), with health and reflection.

Every call is authenticated by `AccessInterceptor` before it reaches a
handler; a handler then limits the caller to its own requests (a foreign
request id is NOT_FOUND, exactly like an unknown one, so an app cannot learn
that another app's request exists). Input is checked before anything is
written: a bad field is INVALID_ARGUMENT, a subject outside the app's
patterns PERMISSION_DENIED, a reused idempotency key with another body
ALREADY_EXISTS, and none of them changes the store.

WatchDeletion polls the store's history (every `poll_s`) rather than
listening to this process: the coordinator's propagation loop writes status
changes from another process. Each watch holds a worker thread, so at most
half the workers watch at once (RESOURCE_EXHAUSTED beyond): the other calls
always find a thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator.deletions import wire
from coordinator.deletions.access import AccessInterceptor, Grant, TokenRegistry
from coordinator.deletions.limits import RateLimit, RateLimiter
from coordinator.deletions.records import DeletionRecord, InvalidDeletion, check_submission
from coordinator.deletions.status import is_final
from coordinator.deletions.store import DeletionStore, IdempotencyConflict, UnknownRequest
from shared.proto.lethe.v1 import deletion_pb2, deletion_pb2_grpc
from shared.storage import storage_problem

DEFAULT_PAGE_SIZE = 50
MAX_REQUEST_BYTES = 256 * 1024  # a submission is a few hundred bytes
POLL_S = 0.15
# A status message travels in an HTTP/2 trailer, percent-encoded (up to 12 bytes a character),
# and clients drop trailers over 8 KiB, turning the call into RESOURCE_EXHAUSTED: messages
# quoting the caller's input (an unknown id, a bad record kind) are cut to stay well below.
MAX_MESSAGE_CHARS = 500


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    context.abort(code, message)
    raise AssertionError("unreachable: abort raises")  # for type checkers


class DeletionServicer(deletion_pb2_grpc.DeletionServiceServicer):
    """Answers `lethe.v1.DeletionService` from a store, for the callers a registry admits."""

    def __init__(
        self,
        store: DeletionStore,
        registry: TokenRegistry,
        *,
        poll_s: float = POLL_S,
        max_watches: int = 8,
    ) -> None:
        self.store = store
        self.registry = registry
        self.poll_s = poll_s
        self._watches = threading.BoundedSemaphore(max_watches)

    def SubmitDeletion(  # noqa: N802 (gRPC's method names)
        self, request: deletion_pb2.SubmitDeletionRequest, context: grpc.ServicerContext
    ) -> deletion_pb2.SubmitDeletionResponse:
        grant = self._grant(context)
        try:
            selectors = tuple(wire.selector_from_proto(s) for s in request.selectors)
            check_submission(request.subject_id, selectors, request.idempotency_key)
        except InvalidDeletion as error:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if not grant.may_submit(request.subject_id):
            _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"app {grant.app!r} may not request deletions for this subject id",
            )
        try:
            record, _created = self.store.submit(
                grant.app, request.subject_id, selectors, request.idempotency_key
            )
        except IdempotencyConflict as error:
            _abort(context, grpc.StatusCode.ALREADY_EXISTS, str(error))
        except Exception as error:
            problem = storage_problem(error)
            if problem is None:
                raise
            # Not acknowledged, so not stored: the app retries with the same key later.
            _abort(context, grpc.StatusCode.UNAVAILABLE, f"cannot store the request now: {problem}")
        return deletion_pb2.SubmitDeletionResponse(
            request_id=record.request_id,
            request=self._shown(record, grant),
        )

    def GetDeletion(  # noqa: N802
        self, request: deletion_pb2.GetDeletionRequest, context: grpc.ServicerContext
    ) -> deletion_pb2.DeletionRequest:
        grant, record = self._visible(request.request_id, context)
        return self._shown(record, grant)

    def ListDeletions(  # noqa: N802
        self, request: deletion_pb2.ListDeletionsRequest, context: grpc.ServicerContext
    ) -> deletion_pb2.ListDeletionsResponse:
        grant = self._grant(context)
        try:
            status = wire.status_from_proto(request.status)
            after = wire.decode_page_token(request.page_token)
            page_size = request.page_size or DEFAULT_PAGE_SIZE
            page = self.store.list(grant.listed_app, status, page_size, after)
        except InvalidDeletion as error:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return deletion_pb2.ListDeletionsResponse(
            requests=[wire.request_to_proto(r, details=grant.sees_fleet) for r in page.records],
            next_page_token=""
            if page.next_after is None
            else wire.encode_page_token(page.next_after),
        )

    def WatchDeletion(  # noqa: N802
        self, request: deletion_pb2.WatchDeletionRequest, context: grpc.ServicerContext
    ) -> Iterator[deletion_pb2.StatusChange]:
        _, record = self._visible(request.request_id, context)
        if not self._watches.acquire(blocking=False):
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "too many watches; retry later")
        try:
            ended = threading.Event()
            context.add_callback(ended.set)  # the client cancelled or the server stops
            seen = 0
            while context.is_active():
                for change in self.store.events(record.request_id, seen):
                    yield wire.change_to_proto(change)
                    seen = change.seq
                    if is_final(change.status, change.attempt, record.max_attempts):
                        return
                ended.wait(self.poll_s)
        finally:
            self._watches.release()

    def _grant(self, context: grpc.ServicerContext) -> Grant:
        grant = self.registry.from_metadata(context.invocation_metadata())
        if grant is None:  # the token was revoked after the interceptor let the call in
            _abort(context, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
        return grant

    def _shown(self, record: DeletionRecord, grant: Grant) -> deletion_pb2.DeletionRequest:
        history = self.store.events(record.request_id)
        return wire.request_to_proto(record, history, details=grant.sees_fleet)

    def _visible(
        self, request_id: str, context: grpc.ServicerContext
    ) -> tuple[Grant, DeletionRecord]:
        """The caller's request `request_id`; NOT_FOUND for unknown and foreign ids alike."""
        grant = self._grant(context)
        if not request_id:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
        try:
            # No request id holds NUL, which PostgreSQL cannot even compare (DataError).
            record = None if "\x00" in request_id else self.store.get(request_id)
        except UnknownRequest:
            record = None
        if record is None or not grant.sees(record.app):
            _abort(context, grpc.StatusCode.NOT_FOUND, f"no deletion request {request_id!r}")
        return grant, record


def serve(
    store: DeletionStore,
    address: str,
    tokens: Path,
    *,
    tls: tuple[bytes, bytes] | None = None,
    workers: int = 16,
    poll_s: float = POLL_S,
    rate_limit: RateLimit | None = None,
) -> grpc.Server:
    """Start the API on `address` (host:port) with the tokens file `tokens`; returns the
    running server, which the caller stops. `tls` is (certificate chain PEM, private key PEM);
    `rate_limit` applies to each token separately.
    """
    registry = TokenRegistry(tokens)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deletion-api"),
        interceptors=[AccessInterceptor(registry, RateLimiter(rate_limit or RateLimit()))],
        options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)],
    )
    servicer = DeletionServicer(store, registry, poll_s=poll_s, max_watches=max(1, workers // 2))
    deletion_pb2_grpc.add_DeletionServiceServicer_to_server(servicer, server)
    checks = health.HealthServicer()
    for name in ("", wire.SERVICE_NAME):
        checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    names = (wire.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        certificate, key = tls
        port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, certificate)]))
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server
