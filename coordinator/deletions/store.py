"""Durable deletion requests over any SQLAlchemy URL (SQLite by default, PostgreSQL too).

"Nothing is lost": `submit` commits the request and its first history entry
in one transaction before it returns, so a request the API acknowledged
survives any crash (SQLite runs in WAL mode with synchronous=FULL). The API
process and the coordinator's propagation loop open the same database, each
with its own `DeletionStore`; every change is a compare-and-set on the row's
`version`, so two processes can never both make a move from the same state,
and a status change and its history entry are committed together (watchers
in other processes poll the history).

Subject ids are hashed with a salt kept in the database (made on first use):
receipts name the hash, which is meaningless without the salt; the raw id is
kept only until the request ends (VERIFIED, or FAILED with no attempt left).
"""

from __future__ import annotations

import itertools
import json
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy import ColumnElement, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import Session, col, select

from coordinator.deletions.records import (
    DeletionPage,
    DeletionRecord,
    InvalidDeletion,
    RecordSelector,
    StatusChange,
    check_submission,
)
from coordinator.deletions.status import (
    FORWARD,
    IllegalTransition,
    RetryPolicy,
    Status,
    check_move,
    is_final,
)
from coordinator.deletions.tables import (
    DeletionEventRow,
    DeletionRow,
    DeletionSecretRow,
    DeletionTable,
)
from shared.crypto import keyed_hash, new_key
from shared.database import database_engine
from shared.receipts import SignedReceipt, canonical_json, parse_body

MAX_PAGE_SIZE = 500
SALT_NAME = "subject-salt"
SUBJECT_DOMAIN = b"lethe/deletion-subject/v1"
BODY_DOMAIN = b"lethe/deletion-body/v1"
# Compare-and-set retries: a loser backs off for a random while (so two writers do not collide
# in lock step) and gives up only after this long, which takes a writer that never lets go.
_CAS_PATIENCE_S = 10.0
_CAS_MAX_BACKOFF_S = 0.05
_OPEN = tuple(status.value for status in FORWARD[:-1])


class UnknownRequest(LookupError):
    """No request has this id."""


class IdempotencyConflict(ValueError):
    """The app reused an idempotency key for a different request; nothing was stored."""


class UnexpectedStatus(IllegalTransition):
    """The request is not in a status the caller expected (another process moved it)."""


class ConcurrentChange(RuntimeError):
    """Other writers kept changing the request; the change was not made."""


Change = tuple[dict[str, Any], DeletionEventRow | None]


class DeletionStore:
    """Deletion requests and their histories in the database at `url`.

    A request's number of attempts is fixed when it is submitted (this
    store's `retry.max_attempts`), so every process that opens the database
    agrees on when it has failed for good; the pause before a retry comes
    from the `retry` of the store that makes the retry.
    """

    def __init__(
        self,
        url: str,
        *,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.retry = retry or RetryPolicy()
        self.clock = clock
        self.engine = database_engine(url)
        try:
            DeletionTable.metadata.create_all(self.engine)
        except DBAPIError:
            # Another process created the tables between the check and the create.
            DeletionTable.metadata.create_all(self.engine)
        self._salt = self._load_salt()

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> DeletionStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def subject_hash(self, subject_id: str) -> str:
        """What receipts name instead of the id: a keyed hash under this database's salt."""
        return keyed_hash(self._salt, SUBJECT_DOMAIN, subject_id.encode("utf-8"))

    # -- writing -----------------------------------------------------------------------------

    def submit(
        self,
        app: str,
        subject_id: str,
        selectors: Iterable[RecordSelector],
        idempotency_key: str,
    ) -> tuple[DeletionRecord, bool]:
        """Store a new request (committed when this returns) or find the one `app` sent before.

        Returns the request and whether it is new. The same key with another
        subject or selectors raises IdempotencyConflict; bad input raises
        InvalidDeletion; either way nothing is written.
        """
        chosen = tuple(selectors)
        if not app:
            raise InvalidDeletion("app is empty")
        check_submission(subject_id, chosen, idempotency_key)
        body = {"subject_id": subject_id, "selectors": [s.to_json() for s in chosen]}
        digest = keyed_hash(self._salt, BODY_DOMAIN, canonical_json(body))
        earlier = self._by_key(app, idempotency_key)
        if earlier is not None:
            return self._replayed(earlier, digest), False
        now = self.clock()
        request_id = str(uuid.uuid4())
        row = DeletionRow(
            request_id=request_id,
            app=app,
            subject_id=subject_id,
            subject_hash=self.subject_hash(subject_id),
            selectors=body["selectors"],
            idempotency_key=idempotency_key,
            body_digest=digest,
            status=Status.RECEIVED.value,
            attempts=1,
            max_attempts=self.retry.max_attempts,
            created_at=now,
            updated_at=now,
            seq=1,
            version=1,
        )
        first = DeletionEventRow(
            request_id=request_id, seq=1, attempt=1, status=Status.RECEIVED.value, at=now
        )
        with Session(self.engine) as session:
            try:
                session.add(row)
                session.flush()  # the request first: the event refers to it
                session.add(first)
                session.commit()
            except IntegrityError:
                # The same app and key committed meanwhile (another worker or process).
                session.rollback()
                earlier = self._by_key(app, idempotency_key)
                if earlier is None:
                    raise
                return self._replayed(earlier, digest), False
            return _record(row), True

    def transition(
        self,
        request_id: str,
        status: Status,
        *,
        reason: str | None = None,
        detail: Mapping[str, Any] | None = None,
        expect: set[Status] | None = None,
    ) -> DeletionRecord:
        """Move a request to `status`, adding the change to its history; or raise, changing nothing.

        The order is RECEIVED -> DISPATCHED -> APPLIED_ON_DEVICES ->
        APPLIED_GLOBALLY -> VERIFIED; FAILED (with a `reason`) from any status
        before VERIFIED; FAILED -> RECEIVED retries while attempts remain (the
        next attempt is due after `RetryPolicy.delay`). VERIFIED needs the
        receipt attached first. A final move (VERIFIED, or FAILED with no
        attempt left) forgets the raw subject id. `detail`
        (a JSON object) is recorded with the change; `expect` refuses the move
        (UnexpectedStatus) unless the request is in one of those statuses.
        """
        target = Status(status)
        if target is Status.FAILED and not reason:
            raise IllegalTransition("a request can only become FAILED with a reason")
        recorded = _json_object(detail or {}, "detail")

        def change(row: DeletionRow) -> Change:
            current = Status(row.status)
            if expect is not None and current not in expect:
                wanted = sorted(s.value for s in expect)
                raise UnexpectedStatus(f"request {request_id} is {current}, not one of {wanted}")
            check_move(current, target, row.attempts, row.max_attempts)
            if target is Status.VERIFIED and row.receipt_body is None:
                raise IllegalTransition("attach the signed receipt before marking VERIFIED")
            now = self.clock()
            values: dict[str, Any] = {
                "status": target.value,
                "reason": reason if target is Status.FAILED else None,
                "next_attempt_at": None,
                "seq": row.seq + 1,
                "updated_at": now,
            }
            if current is Status.FAILED:  # a retry
                values["attempts"] = row.attempts + 1
                values["next_attempt_at"] = now + self.retry.delay(row.attempts)
            if is_final(target, values.get("attempts", row.attempts), row.max_attempts):
                # Nothing more will be done with the raw id: only its keyed hash stays.
                values["subject_id"] = None
            event = DeletionEventRow(
                request_id=request_id,
                seq=row.seq + 1,
                attempt=values.get("attempts", row.attempts),
                status=target.value,
                reason=reason,
                at=now,
                detail=recorded,
            )
            return values, event

        return self._change(request_id, change)

    def attach_receipt(
        self, request_id: str, receipt_bytes: bytes, signature: bytes, key_id: str
    ) -> DeletionRecord:
        """Keep the signed receipt of an APPLIED_GLOBALLY request (then it may become VERIFIED).

        The body must be a well-formed receipt for this request and subject,
        signed by `key_id`; the signature itself is checked by whoever holds
        the public key (`shared.receipts.verify_receipt`). A new receipt may
        replace one attached before, until the request is VERIFIED.
        """
        content = parse_body(receipt_bytes)

        def change(row: DeletionRow) -> Change:
            if row.status != Status.APPLIED_GLOBALLY.value:
                raise IllegalTransition(
                    f"a receipt is attached to an APPLIED_GLOBALLY request, not a {row.status} one"
                )
            named = (content["request_id"], content["subject_hash"], content["key_id"])
            if named != (row.request_id, row.subject_hash, key_id):
                raise InvalidDeletion(
                    "the receipt names another request, subject or key than this one"
                )
            values = {
                "receipt_body": receipt_bytes,
                "receipt_signature": signature,
                "receipt_key_id": key_id,
                "updated_at": self.clock(),
            }
            return values, None

        return self._change(request_id, change)

    def merge_detail(self, request_id: str, detail: Mapping[str, Any]) -> DeletionRecord:
        """Merge `detail` (a JSON object) into the request's details, key by key."""
        added = _json_object(detail, "detail")

        def change(row: DeletionRow) -> Change:
            return {"details": {**row.details, **added}, "updated_at": self.clock()}, None

        return self._change(request_id, change)

    def _change(self, request_id: str, change: Callable[[DeletionRow], Change]) -> DeletionRecord:
        """Apply `change` to the row as read, if nobody changed the row meanwhile (else re-read)."""
        deadline = time.monotonic() + _CAS_PATIENCE_S
        for attempt in itertools.count(1):
            with Session(self.engine) as session:
                row = _row(session, request_id)
                values, event = change(row)
                written = session.execute(
                    update(DeletionRow)
                    .where(
                        col(DeletionRow.request_id) == request_id,
                        col(DeletionRow.version) == row.version,
                    )
                    .values(**values, version=row.version + 1)
                    .execution_options(synchronize_session=False)
                )
                if written.rowcount == 1:  # type: ignore[attr-defined]
                    if event is not None:
                        session.add(event)
                    session.commit()
                    return _record(_row(session, request_id))
                session.rollback()
            if time.monotonic() > deadline:
                break
            time.sleep(random.uniform(0, min(_CAS_MAX_BACKOFF_S, 0.001 * 2**attempt)))
        raise ConcurrentChange(f"request {request_id} kept changing; try again")

    # -- reading -----------------------------------------------------------------------------

    def get(self, request_id: str) -> DeletionRecord:
        with Session(self.engine) as session:
            return _record(_row(session, request_id))

    def events(self, request_id: str, after_seq: int = 0) -> tuple[StatusChange, ...]:
        """The request's history after entry `after_seq`, oldest first (empty for unknown ids)."""
        with Session(self.engine) as session:
            rows = session.exec(
                select(DeletionEventRow)
                .where(
                    DeletionEventRow.request_id == request_id,
                    DeletionEventRow.seq > after_seq,
                )
                .order_by(col(DeletionEventRow.seq))
            )
            return tuple(_change_of(row) for row in rows)

    def due(self, now: float | None = None, limit: int = 100) -> tuple[DeletionRecord, ...]:
        """Requests the propagation loop should work on: not finished, retry time reached."""
        moment = self.clock() if now is None else now
        with Session(self.engine) as session:
            rows = session.exec(
                select(DeletionRow)
                .where(
                    col(DeletionRow.status).in_(_OPEN),
                    col(DeletionRow.next_attempt_at).is_(None)
                    | (col(DeletionRow.next_attempt_at) <= moment),
                )
                .order_by(col(DeletionRow.id))
                .limit(limit)
            )
            return tuple(_record(row) for row in rows)

    def _by_key(self, app: str, idempotency_key: str) -> DeletionRow | None:
        with Session(self.engine) as session:
            return session.exec(
                select(DeletionRow).where(
                    DeletionRow.app == app, DeletionRow.idempotency_key == idempotency_key
                )
            ).first()

    def _replayed(self, row: DeletionRow, digest: str) -> DeletionRecord:
        if row.body_digest != digest:
            raise IdempotencyConflict(
                f"idempotency key {row.idempotency_key!r} was used for another request "
                f"({row.request_id}) with a different subject or selectors; use a new key"
            )
        return _record(row)

    def _load_salt(self) -> bytes:
        with Session(self.engine) as session:
            if session.get(DeletionSecretRow, SALT_NAME) is None:
                try:
                    session.add(DeletionSecretRow(name=SALT_NAME, value=new_key()))
                    session.commit()
                except IntegrityError:  # another process made it first: use theirs
                    session.rollback()
            salt = session.get(DeletionSecretRow, SALT_NAME)
            assert salt is not None
            return salt.value

    def list(
        self,
        app: str | None,
        status: Status | None,
        page_size: int,
        after: int | None = None,
    ) -> DeletionPage:
        """Requests oldest first (of `app`, in `status`; None: all), after cursor `after`.

        The cursor is the position of the last request of the previous page,
        so pages stay stable while new requests arrive.
        """
        if not 0 < page_size <= MAX_PAGE_SIZE:
            raise InvalidDeletion(f"page_size must be 1 to {MAX_PAGE_SIZE}, got {page_size}")
        conditions: list[ColumnElement[bool]] = []
        if app is not None:
            conditions.append(col(DeletionRow.app) == app)
        if status is not None:
            conditions.append(col(DeletionRow.status) == Status(status).value)
        if after is not None:
            conditions.append(col(DeletionRow.id) > after)
        with Session(self.engine) as session:
            rows = session.exec(
                select(DeletionRow)
                .where(*conditions)
                .order_by(col(DeletionRow.id))
                .limit(page_size + 1)
            ).all()
        shown = rows[:page_size]
        more = len(rows) > page_size
        return DeletionPage(tuple(_record(r) for r in shown), shown[-1].id if more else None)


def _row(session: Session, request_id: str) -> DeletionRow:
    row = session.exec(select(DeletionRow).where(DeletionRow.request_id == request_id)).first()
    if row is None:
        raise UnknownRequest(f"no deletion request {request_id!r}")
    return row


def _json_object(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    """A copy of `value` after checking it is a JSON object (stored in a JSON column)."""
    try:
        copy = json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise InvalidDeletion(f"{what} is not a JSON object: {error}") from error
    return copy


def _record(row: DeletionRow) -> DeletionRecord:
    receipt = None
    if row.receipt_body is not None:
        assert row.receipt_signature is not None and row.receipt_key_id is not None
        receipt = SignedReceipt(row.receipt_body, row.receipt_signature, row.receipt_key_id)
    return DeletionRecord(
        request_id=row.request_id,
        app=row.app,
        subject_id=row.subject_id,
        subject_hash=row.subject_hash,
        selectors=tuple(RecordSelector.from_json(s) for s in row.selectors),
        idempotency_key=row.idempotency_key,
        status=Status(row.status),
        reason=row.reason,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        next_attempt_at=row.next_attempt_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
        seq=row.seq,
        receipt=receipt,
        details=dict(row.details),
    )


def _change_of(row: DeletionEventRow) -> StatusChange:
    return StatusChange(
        request_id=row.request_id,
        seq=row.seq,
        attempt=row.attempt,
        status=Status(row.status),
        reason=row.reason,
        at=row.at,
        detail=dict(row.detail),
    )
