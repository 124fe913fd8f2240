"""The deletion API's tables (SQLModel), in their own registry beside the coordinator's.

They live in the coordinator's database, so the API process and the
coordinator's propagation loop share requests through it, but in their own
registry: creating them never touches the coordinator's tables and the
other way round. Only `coordinator.deletions.store` reads or writes them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Column, LargeBinary, UniqueConstraint
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel


class DeletionTable(SQLModel, registry=registry()):
    """Base of the deletion tables; `DeletionTable.metadata` holds exactly them."""


class DeletionRow(DeletionTable, table=True):
    """One deletion request; `id` orders listings (stable, never reused).

    `subject_id` is the raw id: the coordinator needs it to find the records
    and devices to erase. It is cleared when the request ends (VERIFIED, or
    FAILED for good), after which only `subject_hash` (keyed by this database's salt) remains.
    `body_digest` (keyed the same way) lets a repeated submission be matched
    against the first without keeping the id. `seq` is the number of the
    latest history entry. `version` counts changes of the row: every change
    checks and bumps it (compare and set), so two processes can neither both
    move a request from the same status nor overwrite each other's details.
    """

    __tablename__ = "deletion_requests"
    __table_args__ = (UniqueConstraint("app", "idempotency_key"),)

    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(unique=True, index=True)
    app: str = Field(index=True)
    subject_id: str | None = None
    subject_hash: str
    selectors: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    idempotency_key: str
    body_digest: str
    status: str = Field(index=True)
    reason: str | None = None
    attempts: int
    max_attempts: int
    next_attempt_at: float | None = None
    created_at: float
    updated_at: float
    seq: int
    version: int
    receipt_body: bytes | None = Field(default=None, sa_column=Column(LargeBinary))
    receipt_signature: bytes | None = Field(default=None, sa_column=Column(LargeBinary))
    receipt_key_id: str | None = None
    details: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class DeletionEventRow(DeletionTable, table=True):
    """One status change of a request: its history, and what WatchDeletion streams."""

    __tablename__ = "deletion_events"
    __table_args__ = (UniqueConstraint("request_id", "seq"),)

    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(foreign_key="deletion_requests.request_id", index=True)
    seq: int
    attempt: int  # which attempt the change belongs to (1, then 2 after the first retry, ...)
    status: str
    reason: str | None = None
    at: float
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class DeletionSecretRow(DeletionTable, table=True):
    """Per-database secrets, such as the salt of subject hashes (made once, never changed)."""

    __tablename__ = "deletion_secrets"

    name: str = Field(primary_key=True)
    value: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
