"""Between the deletion records and their `lethe.v1` messages, both ways.

One place converts, so the service and the command-line client agree on
every field, and input from the wire is checked by the same constructors as
input from code (a malformed selector raises InvalidDeletion either way).
Page tokens are opaque to clients: a versioned, base64 form of the listing
cursor, refused if anything about it is off.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable

from coordinator.deletions.records import (
    DeletionRecord,
    InvalidDeletion,
    RecordSelector,
    StatusChange,
)
from coordinator.deletions.status import Status
from shared.proto.lethe.v1 import deletion_pb2

SERVICE_NAME = deletion_pb2.DESCRIPTOR.services_by_name["DeletionService"].full_name
_PAGE_TOKEN = re.compile(r"lethe\.v1:after=(0|[1-9][0-9]{0,18})")
_MAX_CURSOR = 2**63 - 1  # row ids are signed 64-bit integers (SQLite refuses larger ones)


def status_to_proto(status: Status) -> int:
    return deletion_pb2.Status.Value(status.value)


def status_from_proto(value: int) -> Status | None:
    """The status a filter names (None for STATUS_UNSPECIFIED: any)."""
    if value == deletion_pb2.STATUS_UNSPECIFIED:
        return None
    try:
        return Status(deletion_pb2.Status.Name(value))
    except ValueError as error:
        raise InvalidDeletion(f"unknown status {value}") from error


def selector_from_proto(message: deletion_pb2.RecordSelector) -> RecordSelector:
    return RecordSelector(
        kinds=tuple(message.kinds),
        from_ts=message.from_ts if message.HasField("from_ts") else None,
        to_ts=message.to_ts if message.HasField("to_ts") else None,
    )


def selector_to_proto(selector: RecordSelector) -> deletion_pb2.RecordSelector:
    return deletion_pb2.RecordSelector(
        kinds=list(selector.kinds), from_ts=selector.from_ts, to_ts=selector.to_ts
    )


def change_to_proto(change: StatusChange) -> deletion_pb2.StatusChange:
    return deletion_pb2.StatusChange(
        request_id=change.request_id,
        seq=change.seq,
        attempt=change.attempt,
        status=status_to_proto(change.status),
        reason=change.reason or "",
        at=change.at,
        detail_json=json.dumps(change.detail, sort_keys=True),
    )


def request_to_proto(
    record: DeletionRecord, history: Iterable[StatusChange] = (), *, details: bool = False
) -> deletion_pb2.DeletionRequest:
    """The request as the API shows it; its `details` (the fleet's side) only when asked."""
    message = deletion_pb2.DeletionRequest(
        request_id=record.request_id,
        app=record.app,
        subject_id=record.subject_id or "",
        subject_hash=record.subject_hash,
        selectors=[selector_to_proto(s) for s in record.selectors],
        idempotency_key=record.idempotency_key,
        status=status_to_proto(record.status),
        failure_reason=record.reason or "",
        attempts=record.attempts,
        max_attempts=record.max_attempts,
        next_attempt_at=record.next_attempt_at,
        created_at=record.created_at,
        updated_at=record.updated_at,
        history=[change_to_proto(c) for c in history],
        details_json=json.dumps(record.details if details else {}, sort_keys=True),
    )
    if record.receipt is not None:
        message.receipt.body = record.receipt.body
        message.receipt.signature = record.receipt.signature
        message.receipt.key_id = record.receipt.key_id
    return message


def encode_page_token(after: int) -> str:
    return base64.urlsafe_b64encode(f"lethe.v1:after={after}".encode()).decode("ascii")


def decode_page_token(token: str) -> int | None:
    """The cursor in a page token (None for the empty token: the first page)."""
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii")
    except (binascii.Error, UnicodeError, ValueError):
        text = ""
    found = _PAGE_TOKEN.fullmatch(text)
    # Only the exact spelling this server gives out (the decoder skips stray characters).
    if (
        found is None
        or int(found.group(1)) > _MAX_CURSOR
        or encode_page_token(int(found.group(1))) != token
    ):
        raise InvalidDeletion("page_token is not one this server gave out")
    return int(found.group(1))
