"""The device's encrypted record store, built so that deleting a subject is final.

Key hierarchy:
    keyfile (mode 0600)        device secret (HMAC: subject hashes, keyfile fingerprint)
                               master key per epoch (wraps subject data keys)
    SQLite (WAL)               per subject: data key wrapped under the current epoch,
                               subject id sealed under the subject's key
                               per record: canonical JSON sealed under the subject's key

Each subject's data key is random; HKDF derives from it an encryption key and a
deduplication key. Subjects are stored under an HMAC of their id, records under
an HMAC (with the subject's own key) of their canonical bytes, and every
ciphertext is bound by AES-GCM associated data to its subject, its row and, for
wrapped keys, its epoch.

Why rotate the master key on every deletion: a copy of the database made
before a deletion still holds the deleted subject's wrapped key, and would stay
decryptable as long as the master key that wrapped it exists. So a deletion
(1) adds a new epoch key to the keyfile, (2) in one transaction deletes the
subject and re-wraps every surviving subject's key under the new epoch, and
(3) destroys the old epoch key. A crash between steps is settled on the next
open by keeping exactly the epoch the database says it uses. Afterwards no
earlier copy of the database can be read with the device's keys: backups of
the database alone are only good until the next deletion, and a backup that
also holds the keyfile is not protected at all.

One process owns a store at a time (an exclusive lock next to the keyfile),
because a rotation by another process would silently invalidate this one's
master key.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from sqlalchemy import Engine, event, func
from sqlmodel import Session, col, create_engine, delete, select

from client.record_tables import RecordRow, RecordStoreTable, StoreMetaRow, SubjectRow
from shared import crypto
from shared.durable import atomic_write_bytes
from shared.records import DEFAULT_MAX_LINE_BYTES, InvalidRecord, Record, parse_jsonl, parse_record

log = logging.getLogger(__name__)

_KEYFILE_FORMAT = "lethe-record-keys/1"
_FINGERPRINT_DOMAIN = b"lethe/record-store-fingerprint/v1"
_SUBJECT_KEY_AAD = b"lethe/subject-key/v1"
_SUBJECT_ID_AAD = b"lethe/subject-id/v1"
_RECORD_AAD = b"lethe/record/v1"
_RECORD_HASH_DOMAIN = b"lethe/record-hash/v1"
_ENCRYPTION_PURPOSE = b"lethe/subject-encryption/v1"
_DEDUP_PURPOSE = b"lethe/subject-dedup/v1"
_PAGE_ROWS = 256
_IN_CLAUSE_ROWS = 500


class RecordStoreError(Exception):
    """Base of the record store's errors."""


class StoreBusyError(RecordStoreError):
    """The store is already open, in this process or another."""


class KeyfileError(RecordStoreError):
    """The keyfile is missing, unreadable, or does not fit the database."""


class UnknownSubjectError(RecordStoreError):
    """The subject has no records on this device; nothing was changed."""


class CorruptRecordError(RecordStoreError):
    """A stored ciphertext did not authenticate: the database was altered or damaged."""


@dataclass(frozen=True)
class IngestReport:
    """What one ingest stored: `subjects` counts the distinct subjects in the input."""

    accepted: int
    duplicates: int
    subjects: int


@dataclass(frozen=True)
class DeletionReport:
    """What a deletion destroyed, and the master-key epoch the store moved to."""

    subject_hash: str
    records_deleted: int
    key_epoch: int


@dataclass(frozen=True)
class Keyfile:
    """The device's key material: one device secret and the master key of each live epoch."""

    device_secret: bytes
    master_keys: Mapping[int, bytes]

    @classmethod
    def create(cls) -> Keyfile:
        return cls(device_secret=crypto.new_key(), master_keys={1: crypto.new_key()})

    @classmethod
    def load(cls, path: Path) -> Keyfile:
        try:
            doc = json.loads(path.read_bytes())
            if doc["format"] != _KEYFILE_FORMAT:
                raise ValueError(f"unknown format {doc['format']!r}")
            master_keys = {
                int(epoch): _decode_key(key) for epoch, key in doc["master_keys"].items()
            }
            if not master_keys:
                raise ValueError("it holds no master key")
            return cls(device_secret=_decode_key(doc["device_secret"]), master_keys=master_keys)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeyfileError(f"cannot read keyfile {path}: {exc}") from exc

    def save(self, path: Path) -> None:
        """Replace the keyfile atomically, so a crash leaves either the old or the new one."""
        doc = {
            "format": _KEYFILE_FORMAT,
            "device_secret": _b64encode(self.device_secret),
            "master_keys": {str(epoch): _b64encode(key) for epoch, key in self.master_keys.items()},
        }
        atomic_write_bytes(path, json.dumps(doc, indent=1).encode("ascii"), mode=0o600)

    def fingerprint(self) -> str:
        """A value the database stores to recognise its own keyfile."""
        return crypto.keyed_hash(self.device_secret, _FINGERPRINT_DOMAIN, b"")

    def keeping(self, epoch: int) -> Keyfile:
        return Keyfile(self.device_secret, {epoch: self.master_keys[epoch]})

    def adding(self, epoch: int, key: bytes) -> Keyfile:
        return Keyfile(self.device_secret, {**self.master_keys, epoch: key})


@dataclass(frozen=True)
class SubjectKeys:
    """The keys derived from one subject's data key, and the record format they seal."""

    encryption: bytes
    dedup: bytes

    @classmethod
    def from_data_key(cls, data_key: bytes) -> SubjectKeys:
        return cls(
            encryption=crypto.derive_key(data_key, _ENCRYPTION_PURPOSE),
            dedup=crypto.derive_key(data_key, _DEDUP_PURPOSE),
        )

    def record_hash(self, record: Record) -> str:
        """Keyed by the subject's own key, so a copy of the database cannot confirm a
        guessed record once the subject is shredded."""
        return crypto.keyed_hash(self.dedup, _RECORD_HASH_DOMAIN, record.canonical_bytes())

    def seal_record(self, subject_hash: str, record_hash: str, record: Record) -> bytes:
        aad = crypto.associated_data(_RECORD_AAD, subject_hash.encode(), record_hash.encode())
        return crypto.encrypt(self.encryption, record.canonical_bytes(), aad)

    def open_record(self, subject_hash: str, record_hash: str, sealed: bytes) -> Record:
        """Decrypt a record; raises crypto.DecryptionError if it is not the one sealed here."""
        aad = crypto.associated_data(_RECORD_AAD, subject_hash.encode(), record_hash.encode())
        return parse_record(crypto.decrypt(self.encryption, sealed, aad))

    def seal_subject_id(self, subject_hash: str, subject_id: str) -> bytes:
        aad = crypto.associated_data(_SUBJECT_ID_AAD, subject_hash.encode())
        return crypto.encrypt(self.encryption, subject_id.encode("utf-8"), aad)

    def open_subject_id(self, subject_hash: str, sealed: bytes) -> str:
        aad = crypto.associated_data(_SUBJECT_ID_AAD, subject_hash.encode())
        return crypto.decrypt(self.encryption, sealed, aad).decode("utf-8")


def wrap_subject_key(master_key: bytes, epoch: int, subject_hash: str, data_key: bytes) -> bytes:
    """Wrap a subject's data key so that it opens only under this epoch and subject."""
    return crypto.wrap_key(master_key, data_key, _subject_key_aad(epoch, subject_hash))


def unwrap_subject_key(master_key: bytes, epoch: int, subject_hash: str, wrapped: bytes) -> bytes:
    """Open a wrapped subject key; raises crypto.DecryptionError under any other key or context."""
    return crypto.unwrap_key(master_key, wrapped, _subject_key_aad(epoch, subject_hash))


class RecordStore:
    """Encrypted per-subject records in SQLite, with crypto-shredding deletion.

    Open with `RecordStore.open`; use as a context manager or call `close`.
    """

    def __init__(
        self,
        engine: Engine,
        keyfile_path: Path,
        keyfile: Keyfile,
        epoch: int,
        lock_fd: int,
        max_line_bytes: int,
    ) -> None:
        self._engine = engine
        self._keyfile_path = keyfile_path
        self._keyfile = keyfile
        self._epoch = epoch
        self._lock_fd: int | None = lock_fd
        self._max_line_bytes = max_line_bytes

    @classmethod
    def open(
        cls,
        db_path: str | os.PathLike[str],
        keyfile_path: str | os.PathLike[str],
        *,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> RecordStore:
        """Open the store, creating the database and keyfile on first use.

        Also finishes a key rotation that a crash interrupted, so that a deletion
        either fully happened (old key gone) or did not happen at all.
        """
        db_path, keyfile_path = Path(db_path), Path(keyfile_path)
        for directory in (db_path.parent, keyfile_path.parent):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = _lock(keyfile_path)
        engine = _create_engine(db_path)
        try:
            RecordStoreTable.metadata.create_all(engine)
            keyfile, epoch = _load_keys(engine, keyfile_path)
            store = cls(engine, keyfile_path, keyfile, epoch, lock_fd, max_line_bytes)
            store._finish_rotation()
        except BaseException:
            engine.dispose()
            os.close(lock_fd)
            raise
        return store

    def close(self) -> None:
        """Release the database and the lock; closing twice is harmless."""
        if self._lock_fd is None:
            return
        self._engine.dispose()
        os.close(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def key_epoch(self) -> int:
        """The master-key epoch; it advances by one with every deletion."""
        return self._epoch

    def subject_hash(self, subject_id: str) -> str:
        return crypto.subject_hash(self._keyfile.device_secret, subject_id)

    def ingest_file(self, path: str | os.PathLike[str]) -> IngestReport:
        """Store every record of a JSON-lines file, or none of them.

        Raises shared.records.RecordFileError, listing the bad lines, before
        anything is written.
        """
        records = parse_jsonl(Path(path).read_bytes(), max_line_bytes=self._max_line_bytes)
        return self.ingest(records)

    def ingest(self, records: Iterable[Record]) -> IngestReport:
        """Store records in one transaction, skipping ones already stored.

        Returns only after the commit, so whatever it reports as accepted is on disk.
        """
        records = list(records)
        with Session(self._engine) as session:
            keys: dict[str, SubjectKeys] = {}
            hashed: list[tuple[str, str, Record]] = []
            for record in records:
                subject = self.subject_hash(record.subject_id)
                if subject not in keys:
                    keys[subject] = self._subject_keys(session, subject, record.subject_id)
                hashed.append((subject, keys[subject].record_hash(record), record))
            seen = _stored_pairs(session, [record_hash for _, record_hash, _ in hashed])
            accepted = 0
            for subject, record_hash, record in hashed:
                if (subject, record_hash) in seen:
                    continue
                seen.add((subject, record_hash))
                sealed = keys[subject].seal_record(subject, record_hash, record)
                session.add(
                    RecordRow(subject_hash=subject, record_hash=record_hash, sealed_record=sealed)
                )
                accepted += 1
            session.commit()
        return IngestReport(
            accepted=accepted, duplicates=len(records) - accepted, subjects=len(keys)
        )

    def records(self, subject_id: str | None = None) -> Iterator[Record]:
        """Decrypted records in ingest order, of one subject or of all.

        Reads page by page in short transactions, so the caller may write to the
        store (even delete a subject) while iterating.
        """
        return (record for _row_id, record in self.numbered_records(subject_id))

    def numbered_records(
        self, subject_id: str | None = None, after: int = 0
    ) -> Iterator[tuple[int, Record]]:
        """(row id, record) in ingest order, for rows after `after`.

        Row ids only grow, so a reader that remembers the last id it handled
        (the daemon's training watermark) sees each new record exactly once.
        """
        query = select(RecordRow).order_by(RecordRow.id).limit(_PAGE_ROWS)
        if subject_id is not None:
            query = query.where(RecordRow.subject_hash == self.subject_hash(subject_id))
        keys: dict[str, SubjectKeys] = {}
        last_id = after
        while True:
            with Session(self._engine) as session:
                page = session.exec(query.where(RecordRow.id > last_id)).all()
                for row in page:
                    if row.subject_hash not in keys:
                        keys[row.subject_hash] = self._stored_subject_keys(
                            session, row.subject_hash
                        )
            if not page:
                return
            for row in page:
                yield row.id, _open_row(keys[row.subject_hash], row)
            last_id = page[-1].id

    def subjects(self) -> list[str]:
        """The hashes of the subjects that have records here, sorted."""
        with Session(self._engine) as session:
            return list(
                session.exec(select(SubjectRow.subject_hash).order_by(SubjectRow.subject_hash))
            )

    def subject_ids(self) -> list[str]:
        """The subject ids themselves, decrypted, sorted: for the device's own use only."""
        with Session(self._engine) as session:
            rows = session.exec(select(SubjectRow)).all()
            return sorted(
                self._unwrap(row).open_subject_id(row.subject_hash, row.sealed_subject_id)
                for row in rows
            )

    def count(self, subject_id: str | None = None, after: int = 0) -> int:
        """Records stored (of one subject, with row ids after `after`)."""
        query = select(func.count()).select_from(RecordRow).where(RecordRow.id > after)
        if subject_id is not None:
            query = query.where(RecordRow.subject_hash == self.subject_hash(subject_id))
        with Session(self._engine) as session:
            return session.exec(query).one()

    def delete_subject(self, subject_id: str) -> DeletionReport:
        """Destroy a subject's key and records, and rotate the master key.

        Raises UnknownSubjectError, changing nothing, when the subject has no records.
        """
        subject = self.subject_hash(subject_id)
        with Session(self._engine) as session:
            if session.get(SubjectRow, subject) is None:
                raise UnknownSubjectError(
                    f"no subject with hash {subject[:16]}... on this device; nothing deleted"
                )
        new_epoch = self._add_epoch()
        deleted = self._delete_and_rewrap(subject, new_epoch)
        self._finish_rotation()
        return DeletionReport(subject_hash=subject, records_deleted=deleted, key_epoch=new_epoch)

    def delete_records(self, subject_id: str, selected: Callable[[Record], bool]) -> DeletionReport:
        """Delete the subject's records that `selected` picks; picking all of them is
        `delete_subject` (the key is shredded). Otherwise the subject and its key stay, the
        rows go (overwritten: secure_delete) and the WAL is checkpointed.

        Raises UnknownSubjectError, changing nothing, when the subject has no records.
        """
        rows = list(self.numbered_records(subject_id))
        if not rows:
            raise UnknownSubjectError(
                f"no subject with hash {self.subject_hash(subject_id)[:16]}... on this device; "
                "nothing deleted"
            )
        chosen = [row_id for row_id, record in rows if selected(record)]
        if len(chosen) == len(rows):
            return self.delete_subject(subject_id)
        with Session(self._engine) as session:
            for start in range(0, len(chosen), _IN_CLAUSE_ROWS):
                part = chosen[start : start + _IN_CLAUSE_ROWS]
                session.exec(delete(RecordRow).where(col(RecordRow.id).in_(part)))
            session.commit()
        _checkpoint(self._engine)
        return DeletionReport(self.subject_hash(subject_id), len(chosen), self._epoch)

    def _add_epoch(self) -> int:
        """Rotation step 1: put a new master key in the keyfile before anything uses it."""
        new_epoch = self._epoch + 1
        keyfile = self._keyfile.keeping(self._epoch).adding(new_epoch, crypto.new_key())
        keyfile.save(self._keyfile_path)
        self._keyfile = keyfile
        return new_epoch

    def _delete_and_rewrap(self, subject: str, new_epoch: int) -> int:
        """Rotation step 2: one transaction deletes the subject and moves survivors to the
        new epoch, so the database is wholly at the old epoch or wholly at the new one."""
        new_master = self._keyfile.master_keys[new_epoch]
        with Session(self._engine) as session:
            deleted = session.exec(delete(RecordRow).where(RecordRow.subject_hash == subject))
            session.exec(delete(SubjectRow).where(SubjectRow.subject_hash == subject))
            for row in session.exec(select(SubjectRow)).all():
                data_key = self._unwrap_data_key(row)
                row.wrapped_key = wrap_subject_key(
                    new_master, new_epoch, row.subject_hash, data_key
                )
                session.add(row)
            meta = session.get_one(StoreMetaRow, 1)
            meta.key_epoch = new_epoch
            session.add(meta)
            session.commit()
        self._epoch = new_epoch
        return deleted.rowcount

    def _finish_rotation(self) -> None:
        """Rotation step 3: destroy every master key but the current one, then checkpoint
        the WAL so that the live files keep no pages from before the deletion."""
        if len(self._keyfile.master_keys) > 1:
            self._keyfile = self._keyfile.keeping(self._epoch)
            self._keyfile.save(self._keyfile_path)
        _checkpoint(self._engine)

    def _subject_keys(self, session: Session, subject: str, subject_id: str) -> SubjectKeys:
        """The keys of a subject, creating (in the session's transaction) a new one."""
        row = session.get(SubjectRow, subject)
        if row is not None:
            return self._unwrap(row)
        data_key = crypto.new_key()
        keys = SubjectKeys.from_data_key(data_key)
        master = self._keyfile.master_keys[self._epoch]
        session.add(
            SubjectRow(
                subject_hash=subject,
                wrapped_key=wrap_subject_key(master, self._epoch, subject, data_key),
                sealed_subject_id=keys.seal_subject_id(subject, subject_id),
            )
        )
        session.flush()
        return keys

    def _stored_subject_keys(self, session: Session, subject: str) -> SubjectKeys:
        return self._unwrap(session.get_one(SubjectRow, subject))

    def _unwrap(self, row: SubjectRow) -> SubjectKeys:
        return SubjectKeys.from_data_key(self._unwrap_data_key(row))

    def _unwrap_data_key(self, row: SubjectRow) -> bytes:
        master = self._keyfile.master_keys[self._epoch]
        try:
            return unwrap_subject_key(master, self._epoch, row.subject_hash, row.wrapped_key)
        except crypto.DecryptionError as exc:
            raise CorruptRecordError(
                f"the key of subject {row.subject_hash[:16]}... does not unwrap"
            ) from exc


def _open_row(keys: SubjectKeys, row: RecordRow) -> Record:
    try:
        return keys.open_record(row.subject_hash, row.record_hash, row.sealed_record)
    except (crypto.DecryptionError, InvalidRecord) as exc:
        raise CorruptRecordError(f"record row {row.id} does not decrypt: {exc}") from exc


def _stored_pairs(session: Session, record_hashes: list[str]) -> set[tuple[str, str]]:
    """The (subject hash, record hash) pairs among these record hashes already stored."""
    stored: set[tuple[str, str]] = set()
    for start in range(0, len(record_hashes), _IN_CLAUSE_ROWS):
        chunk = record_hashes[start : start + _IN_CLAUSE_ROWS]
        query = select(RecordRow.subject_hash, RecordRow.record_hash).where(
            col(RecordRow.record_hash).in_(chunk)
        )
        stored.update((subject, record_hash) for subject, record_hash in session.exec(query))
    return stored


def _load_keys(engine: Engine, keyfile_path: Path) -> tuple[Keyfile, int]:
    """Find the keyfile and epoch that fit the database, creating either on first use."""
    with Session(engine) as session:
        meta = session.get(StoreMetaRow, 1)
        if keyfile_path.exists():
            keyfile = Keyfile.load(keyfile_path)
        elif meta is None:
            keyfile = Keyfile.create()
            keyfile.save(keyfile_path)
        else:
            raise KeyfileError(
                f"keyfile {keyfile_path} is missing: the records in this database cannot be read"
            )
        if meta is None:
            meta = StoreMetaRow(
                key_epoch=max(keyfile.master_keys), device_fingerprint=keyfile.fingerprint()
            )
            session.add(meta)
            session.commit()
        if meta.device_fingerprint != keyfile.fingerprint():
            raise KeyfileError(f"keyfile {keyfile_path} belongs to another record store")
        if meta.key_epoch not in keyfile.master_keys:
            raise KeyfileError(
                f"the database is at key epoch {meta.key_epoch}, whose master key was destroyed "
                f"(the keyfile holds epochs {sorted(keyfile.master_keys)}): it is a copy made "
                "before a subject deletion and can no longer be read"
            )
        return keyfile, meta.key_epoch


def _create_engine(db_path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{db_path}")
    event.listen(engine, "connect", _configure_connection)
    return engine


def _configure_connection(dbapi_connection: sqlite3.Connection, _connection_record: object) -> None:
    """WAL for crash safety; FULL sync so a returned commit survives power loss;
    secure_delete so deleted rows are zeroed in place rather than left in free space."""
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "secure_delete=ON", "foreign_keys=ON"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _checkpoint(engine: Engine) -> None:
    """Copy the WAL into the database file and truncate it to zero bytes."""
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        busy, _, _ = cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        cursor.close()
    finally:
        connection.close()
    if busy:
        log.warning("WAL checkpoint blocked by another reader; old pages stay in the WAL for now")


def _lock(keyfile_path: Path) -> int:
    lock_path = keyfile_path.with_name(keyfile_path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreBusyError(
            f"the record store of {keyfile_path} is already open (one owner at a time)"
        ) from None
    return fd


def _subject_key_aad(epoch: int, subject_hash: str) -> bytes:
    return crypto.associated_data(_SUBJECT_KEY_AAD, epoch.to_bytes(8, "big"), subject_hash.encode())


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _decode_key(text: str) -> bytes:
    key = base64.b64decode(text, validate=True)
    if len(key) != crypto.KEY_BYTES:
        raise ValueError(f"a key has {len(key)} bytes, expected {crypto.KEY_BYTES}")
    return key
