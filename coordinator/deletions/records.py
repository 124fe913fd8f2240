"""What a deletion request is, as plain data: the store returns these, never ORM rows.

Frozen dataclasses can be handed to other threads (the gRPC workers, the
propagation loop) without a database session behind them. Construction
validates what a caller can get wrong (selectors), and the checks on the
submitted strings live here too, so the gRPC service and the store refuse
the same inputs with the same words.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any

from coordinator.deletions.status import Status, is_final
from shared.receipts import SignedReceipt
from shared.records import InvalidDeletion, RecordSelector

MAX_SUBJECT_CHARS = 256
MAX_KEY_CHARS = 128
MAX_SELECTORS = 32


def check_subject_id(subject_id: str) -> None:
    if not subject_id.strip():
        raise InvalidDeletion("subject_id is empty")
    if len(subject_id) > MAX_SUBJECT_CHARS:
        raise InvalidDeletion(
            f"subject_id has {len(subject_id)} characters, over {MAX_SUBJECT_CHARS}"
        )
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in subject_id):
        raise InvalidDeletion("subject_id holds control characters")


def check_idempotency_key(key: str) -> None:
    """1 to 128 printable ASCII characters: apps derive them from their own request ids."""
    if not 0 < len(key) <= MAX_KEY_CHARS:
        raise InvalidDeletion(f"idempotency_key must have 1 to {MAX_KEY_CHARS} characters")
    if not all(" " <= c <= "~" for c in key):
        raise InvalidDeletion("idempotency_key must be printable ASCII")


def check_submission(
    subject_id: str, selectors: tuple[RecordSelector, ...], idempotency_key: str
) -> None:
    """Raise InvalidDeletion unless a request with these fields may be stored."""
    check_subject_id(subject_id)
    check_idempotency_key(idempotency_key)
    if len(selectors) > MAX_SELECTORS:
        raise InvalidDeletion(f"{len(selectors)} selectors, over the limit of {MAX_SELECTORS}")


@dataclass(frozen=True)
class StatusChange:
    """One entry of a request's history; `seq` counts 1, 2, 3, ... per request.

    `attempt` is the attempt the change belongs to, so a reader of the
    history alone can tell whether a FAILED entry is final.
    """

    request_id: str
    seq: int
    attempt: int
    status: Status
    reason: str | None
    at: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeletionRecord:
    """A deletion request as stored now.

    `subject_id` is the raw id, which the coordinator needs to find the
    devices and records to erase; it is None once the request has ended
    (VERIFIED, or FAILED for good: the coordinator forgets it then).
    `subject_hash` is what receipts name.
    `seq` is the last history entry's number. `reason` says why the request
    is FAILED, when it is.
    """

    request_id: str
    app: str
    subject_id: str | None
    subject_hash: str
    selectors: tuple[RecordSelector, ...]
    idempotency_key: str
    status: Status
    reason: str | None
    attempts: int
    max_attempts: int
    next_attempt_at: float | None
    created_at: float
    updated_at: float
    seq: int
    receipt: SignedReceipt | None
    details: dict[str, Any]

    @property
    def final(self) -> bool:
        """Nothing more will happen to it: VERIFIED, or FAILED with no attempt left."""
        return is_final(self.status, self.attempts, self.max_attempts)


@dataclass(frozen=True)
class DeletionPage:
    """One page of a listing, and where the next one starts (None: this was the last)."""

    records: tuple[DeletionRecord, ...]
    next_after: int | None
