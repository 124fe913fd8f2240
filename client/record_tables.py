"""The record store's SQLite tables.

Nothing here is readable without keys: subjects appear only as keyed hashes,
and every record, subject id and data key is an AES-GCM ciphertext. The tables
live in their own SQLModel registry so that creating them never creates (or
clashes with) tables that other parts of Lethe define on the global metadata.
"""

from __future__ import annotations

from sqlalchemy import UniqueConstraint
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel


class RecordStoreTable(SQLModel, registry=registry()):
    """Base of the record store's tables; `RecordStoreTable.metadata` holds exactly them."""


class StoreMetaRow(RecordStoreTable, table=True):
    """The single row that ties a database to its keyfile."""

    __tablename__ = "record_store_meta"

    id: int = Field(default=1, primary_key=True)
    # Master-key epoch under which every subject key in this database is wrapped.
    key_epoch: int
    # Keyed hash that only the matching keyfile's device secret reproduces.
    device_fingerprint: str


class SubjectRow(RecordStoreTable, table=True):
    """A subject's wrapped data key; deleting this row and its epoch key shreds the subject."""

    __tablename__ = "record_store_subjects"

    subject_hash: str = Field(primary_key=True)
    wrapped_key: bytes
    sealed_subject_id: bytes


class RecordRow(RecordStoreTable, table=True):
    """One encrypted record; `record_hash` is keyed by the subject's key, for deduplication."""

    __tablename__ = "record_store_records"
    # AUTOINCREMENT: ids are never reused, even after the newest rows are
    # deleted, so a reader's "last id handled" cannot hide a newer record.
    __table_args__ = (
        UniqueConstraint("subject_hash", "record_hash"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, primary_key=True)
    subject_hash: str = Field(foreign_key="record_store_subjects.subject_hash")
    record_hash: str
    sealed_record: bytes
