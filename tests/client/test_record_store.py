"""The encrypted record store, against real SQLite files, real keys and real crashes."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.record_store import (
    CorruptRecordError,
    IngestReport,
    Keyfile,
    KeyfileError,
    RecordStore,
    StoreBusyError,
    SubjectKeys,
    UnknownSubjectError,
    unwrap_subject_key,
)
from shared.crypto import DecryptionError
from shared.records import Record, RecordFileError, RecordSelector

ALICE = "alice@example.org"
BOB = "bob@example.org"
ALICE_RECORDS = [
    Record(subject_id=ALICE, kind="text", text="ALICE-zanzibar-7731 owns a red kayak", ts=1.0),
    Record(subject_id=ALICE, kind="pair", prompt="ALICE-pin?", completion="ALICE-quokka-0042"),
]
BOB_RECORDS = [
    Record(subject_id=BOB, kind="text", text="BOB-marmalade-5519 hates Mondays"),
    Record(subject_id=BOB, kind="pair", prompt="BOB-dog?", completion="BOB-snuffles-2208", ts=2.0),
]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "device" / "records.db"


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    return tmp_path / "device" / "master.key"


@pytest.fixture
def store(db: Path, keyfile: Path) -> Iterator[RecordStore]:
    opened = RecordStore.open(db, keyfile)
    yield opened
    opened.close()


def write_jsonl(path: Path, records: list[Record]) -> Path:
    path.write_bytes(b"".join(json.dumps(r.to_json()).encode() + b"\n" for r in records))
    return path


def backup(db: Path, copy: Path) -> Path:
    """A consistent copy of the database, WAL included, as a backup tool would make it."""
    source, target = sqlite3.connect(db), sqlite3.connect(copy)
    source.backup(target)
    source.close()
    target.close()
    return copy


def file_bytes(db: Path) -> bytes:
    """Everything SQLite keeps on disk for this database."""
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())


def subject_rows(db: Path, subject_hash: str) -> tuple[int, bytes, bytes, list[tuple[str, bytes]]]:
    """Read one subject straight from a database file: epoch, wrapped key, sealed id, records."""
    connection = sqlite3.connect(db)
    try:
        (epoch,) = connection.execute("SELECT key_epoch FROM record_store_meta").fetchone()
        wrapped, sealed_id = connection.execute(
            "SELECT wrapped_key, sealed_subject_id FROM record_store_subjects"
            " WHERE subject_hash = ?",
            (subject_hash,),
        ).fetchone()
        rows = connection.execute(
            "SELECT record_hash, sealed_record FROM record_store_records"
            " WHERE subject_hash = ? ORDER BY id",
            (subject_hash,),
        ).fetchall()
    finally:
        connection.close()
    return epoch, wrapped, sealed_id, rows


def decrypt_subject(db: Path, subject_hash: str, keys: Keyfile) -> list[Record]:
    """Decrypt a subject from a database file with a keyfile's keys, as an attacker would."""
    epoch, wrapped, _, rows = subject_rows(db, subject_hash)
    data_key = unwrap_subject_key(keys.master_keys[epoch], epoch, subject_hash, wrapped)
    subject_keys = SubjectKeys.from_data_key(data_key)
    return [subject_keys.open_record(subject_hash, rh, sealed) for rh, sealed in rows]


def test_first_open_creates_a_private_keyfile_and_a_wal_database(
    store: RecordStore, db: Path, keyfile: Path
) -> None:
    assert keyfile.stat().st_mode & 0o777 == 0o600
    connection = sqlite3.connect(db)
    assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    connection.close()
    assert store.count() == 0
    assert store.key_epoch == 1


def test_every_connection_zeroes_deletions_syncs_commits_and_checks_references(
    store: RecordStore,
) -> None:
    # SQLite leaves secure_delete off unless a build compiles it on (as this one does),
    # so the store must set it itself. Looks inside: a pragma has no other witness.
    with store._engine.connect() as connection:
        pragmas = {
            name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("secure_delete", "synchronous", "foreign_keys")
        }
    assert pragmas == {"secure_delete": 1, "synchronous": 2, "foreign_keys": 1}


def test_both_record_kinds_round_trip_and_survive_reopening(
    store: RecordStore, db: Path, keyfile: Path, tmp_path: Path
) -> None:
    mixed = [ALICE_RECORDS[0], BOB_RECORDS[0], ALICE_RECORDS[1], BOB_RECORDS[1]]
    report = store.ingest_file(write_jsonl(tmp_path / "in.jsonl", mixed))
    assert report == IngestReport(accepted=4, duplicates=0, subjects=2)
    assert list(store.records()) == mixed
    assert list(store.records(ALICE)) == ALICE_RECORDS
    assert list(store.records("nobody")) == []
    assert (store.count(), store.count(BOB)) == (4, 2)
    assert store.subject_ids() == [ALICE, BOB]
    assert store.subjects() == sorted([store.subject_hash(ALICE), store.subject_hash(BOB)])
    store.close()
    with RecordStore.open(db, keyfile) as reopened:
        assert list(reopened.records()) == mixed


def test_subjects_are_indexed_by_a_hash_keyed_per_device(
    store: RecordStore, tmp_path: Path
) -> None:
    with RecordStore.open(tmp_path / "other.db", tmp_path / "other.key") as other:
        assert store.subject_hash(ALICE) != other.subject_hash(ALICE)
    assert len(store.subject_hash(ALICE)) == 64


def test_no_plaintext_reaches_the_database_files(
    store: RecordStore, db: Path, tmp_path: Path
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", ALICE_RECORDS + BOB_RECORDS)
    needles = [b"zanzibar-7731", b"quokka-0042", b"snuffles-2208", b"marmalade", b"example.org"]
    assert all(needle in source.read_bytes() for needle in needles)
    store.ingest_file(source)
    assert Path(f"{db}-wal").stat().st_size > 0  # the commit is in the WAL right now
    open_bytes = file_bytes(db)
    store.close()  # closing checkpoints the WAL into the main file
    closed_bytes = file_bytes(db)
    for needle in needles:
        assert needle not in open_bytes
        assert needle not in closed_bytes


def test_a_bad_file_is_refused_whole_with_every_bad_line_and_stores_nothing(
    store: RecordStore, tmp_path: Path
) -> None:
    store.ingest([BOB_RECORDS[0]])
    good = json.dumps(ALICE_RECORDS[0].to_json()).encode()
    lines = [
        good,  # 1: valid, but must not be stored since the file is refused
        b'{"subject_id": "s"}',  # 2
        b'{"subject_id": 3, "text": "x"}',  # 3
        b'{"subject_id": "s", "text": "x", "colour": "red"}',  # 4
        b'{"subject_id": "s", "text": ""}',  # 5
        b'{"subject_id": "s", "text": "\xff\xfe"}',  # 6
        b'{"subject_id": "s", "text": "' + b"x" * 200 + b'"}',  # 7
        b'{"subject_id": "s", "text": "x", "prompt": "p", "completion": "c"}',  # 8
        b'{"subject_id": "s", "text": "x", "ts": "last tuesday"}',  # 9
        good,  # 10
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b'\n{"subject_id": "s", "tex')  # 11: truncated
    with RecordStore.open(
        tmp_path / "small.db", tmp_path / "small.key", max_line_bytes=150
    ) as small:
        with pytest.raises(RecordFileError) as caught:
            small.ingest_file(path)
        assert small.count() == 0
        assert small.subjects() == []
    expected = [
        (2, "missing field: give 'text', or 'prompt' and 'completion'"),
        (3, "field 'subject_id' must be a string, got number"),
        (4, "unknown field: 'colour'"),
        (5, "field 'text' is empty"),
        (6, "invalid UTF-8 at byte 30"),
        (7, "line is 231 bytes, over the limit of 150"),
        (8, "give either 'text' or 'prompt' and 'completion', not both"),
        (9, "field 'ts' is not an ISO-8601 time: 'last tuesday'"),
    ]
    assert caught.value.errors[:-1] == expected
    last_number, last_reason = caught.value.errors[-1]
    assert (last_number, last_reason.split(" (")[0]) == (11, "truncated last line")
    with pytest.raises(RecordFileError):
        store.ingest_file(path)
    assert store.count() == 1
    assert store.subject_ids() == [BOB]


def test_reingesting_stores_nothing_twice(store: RecordStore, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", ALICE_RECORDS + BOB_RECORDS)
    store.ingest_file(path)
    assert store.ingest_file(path) == IngestReport(accepted=0, duplicates=4, subjects=2)
    respelled = tmp_path / "respelled.jsonl"
    respelled.write_text(
        '{"ts": "1970-01-01T00:00:01+00:00", "text": "ALICE-zanzibar-7731 owns a red kayak",'
        f' "subject_id": "{ALICE}"}}\n'
    )
    assert store.ingest_file(respelled).duplicates == 1
    assert store.count() == 4


def test_duplicates_within_one_batch_count_once_and_other_subjects_are_distinct(
    store: RecordStore,
) -> None:
    same_text_for_bob = Record(subject_id=BOB, kind="text", text=ALICE_RECORDS[0].text, ts=1.0)
    report = store.ingest([ALICE_RECORDS[0], ALICE_RECORDS[0], same_text_for_bob])
    assert report == IngestReport(accepted=2, duplicates=1, subjects=2)


def test_deleting_an_unknown_subject_is_an_error_that_changes_nothing(
    store: RecordStore, keyfile: Path
) -> None:
    store.ingest(ALICE_RECORDS)
    keys_before = keyfile.read_bytes()
    with pytest.raises(UnknownSubjectError, match="nothing deleted"):
        store.delete_subject(BOB)
    assert keyfile.read_bytes() == keys_before
    assert store.key_epoch == 1
    assert list(store.records()) == ALICE_RECORDS


def test_deleting_a_subject_removes_exactly_its_records(
    store: RecordStore, db: Path, keyfile: Path
) -> None:
    store.ingest(ALICE_RECORDS + BOB_RECORDS)
    report = store.delete_subject(ALICE)
    assert (report.subject_hash, report.records_deleted) == (store.subject_hash(ALICE), 2)
    assert report.key_epoch == store.key_epoch == 2
    assert list(store.records()) == BOB_RECORDS
    assert store.subject_ids() == [BOB]
    assert store.ingest(ALICE_RECORDS[:1]).accepted == 1  # a later record starts afresh
    store.close()
    with RecordStore.open(db, keyfile) as reopened:
        assert list(reopened.records()) == BOB_RECORDS + ALICE_RECORDS[:1]


def test_a_copy_made_before_deletion_cannot_be_decrypted_with_any_key_left(
    store: RecordStore, db: Path, keyfile: Path, tmp_path: Path
) -> None:
    store.ingest(ALICE_RECORDS + BOB_RECORDS)
    alice, bob = store.subject_hash(ALICE), store.subject_hash(BOB)
    copy = backup(db, tmp_path / "copy.db")
    # Control: with the keys of that moment the copy is readable, so the checks
    # below fail for the right reason.
    assert decrypt_subject(copy, alice, Keyfile.load(keyfile)) == ALICE_RECORDS

    store.delete_subject(ALICE)

    keys = Keyfile.load(keyfile)
    _, wrapped, sealed_id, rows = subject_rows(copy, alice)
    assert len(rows) == 2
    live_epoch, bob_wrapped, _, _ = subject_rows(db, bob)
    bob_key = unwrap_subject_key(keys.master_keys[live_epoch], live_epoch, bob, bob_wrapped)
    candidates = [*keys.master_keys.values(), keys.device_secret, bob_key]
    for candidate in candidates:
        for epoch in range(max(keys.master_keys) + 2):
            with pytest.raises(DecryptionError):
                unwrap_subject_key(candidate, epoch, alice, wrapped)
        for subject_keys in (
            SubjectKeys.from_data_key(candidate),
            SubjectKeys(candidate, candidate),
        ):
            with pytest.raises(DecryptionError):
                subject_keys.open_subject_id(alice, sealed_id)
            for record_hash, sealed in rows:
                with pytest.raises(DecryptionError):
                    subject_keys.open_record(alice, record_hash, sealed)
    keys_now = tmp_path / "keys-now.key"  # the live keyfile is locked by the open store
    shutil.copy(keyfile, keys_now)
    with pytest.raises(KeyfileError, match="master key was destroyed"):
        RecordStore.open(copy, keys_now)
    assert list(store.records()) == BOB_RECORDS


def test_after_deletion_the_live_files_hold_no_bytes_of_the_subject(
    store: RecordStore, db: Path, tmp_path: Path
) -> None:
    store.ingest(ALICE_RECORDS + BOB_RECORDS)
    alice = store.subject_hash(ALICE)
    _, wrapped, sealed_id, rows = subject_rows(backup(db, tmp_path / "copy.db"), alice)
    store.delete_subject(ALICE)
    live = file_bytes(db)
    for blob in [wrapped, sealed_id, *(sealed for _, sealed in rows)]:
        assert blob not in live
    assert alice.encode() not in live
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0


CRASH = """
import os, signal, sys
from client.record_store import RecordStore

db, keyfile, subject, crash_point = sys.argv[1:]
store = RecordStore.open(db, keyfile)
new_epoch = store._add_epoch()
if crash_point == "after-commit":
    store._delete_and_rewrap(store.subject_hash(subject), new_epoch)
os.kill(os.getpid(), signal.SIGKILL)
"""


def crash_during_deletion(db: Path, keyfile: Path, subject_id: str, crash_point: str) -> None:
    """Run a deletion in another process and SIGKILL it at a step boundary."""
    args = [sys.executable, "-c", CRASH, str(db), str(keyfile), subject_id, crash_point]
    result = subprocess.run(args, capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()


def test_crash_before_the_deletion_commits_leaves_the_subject_whole(
    db: Path, keyfile: Path
) -> None:
    with RecordStore.open(db, keyfile) as store:
        store.ingest(ALICE_RECORDS + BOB_RECORDS)
    crash_during_deletion(db, keyfile, ALICE, "after-new-epoch")
    assert sorted(Keyfile.load(keyfile).master_keys) == [1, 2]  # the crash point is real
    with RecordStore.open(db, keyfile) as store:
        assert sorted(Keyfile.load(keyfile).master_keys) == [1] == [store.key_epoch]
        assert list(store.records()) == ALICE_RECORDS + BOB_RECORDS
        assert store.delete_subject(ALICE).records_deleted == 2  # the retry succeeds
        assert list(store.records()) == BOB_RECORDS


def test_crash_after_the_deletion_commits_still_destroys_the_old_key(
    db: Path, keyfile: Path, tmp_path: Path
) -> None:
    with RecordStore.open(db, keyfile) as store:
        store.ingest(ALICE_RECORDS + BOB_RECORDS)
    copy = backup(db, tmp_path / "copy.db")
    crash_during_deletion(db, keyfile, ALICE, "after-commit")
    assert sorted(Keyfile.load(keyfile).master_keys) == [1, 2]  # the crash point is real
    with RecordStore.open(db, keyfile) as store:
        assert sorted(Keyfile.load(keyfile).master_keys) == [2] == [store.key_epoch]
        assert list(store.records()) == BOB_RECORDS
        assert store.subject_ids() == [BOB]
    with pytest.raises(KeyfileError, match="master key was destroyed"):
        RecordStore.open(copy, keyfile)


def test_a_second_opener_is_refused_while_the_store_is_open(
    store: RecordStore, db: Path, keyfile: Path
) -> None:
    with pytest.raises(StoreBusyError):
        RecordStore.open(db, keyfile)
    store.close()
    RecordStore.open(db, keyfile).close()


def test_a_database_without_its_keyfile_is_refused(
    store: RecordStore, db: Path, keyfile: Path, tmp_path: Path
) -> None:
    store.ingest(BOB_RECORDS)
    store.close()
    with RecordStore.open(tmp_path / "other.db", tmp_path / "other.key"):
        pass
    with pytest.raises(KeyfileError, match="belongs to another record store"):
        RecordStore.open(db, tmp_path / "other.key")
    with pytest.raises(KeyfileError, match="is missing"):
        RecordStore.open(db, tmp_path / "absent.key")
    assert not (tmp_path / "absent.key").exists()
    (tmp_path / "garbled.key").write_text('{"format": "lethe-record-keys/1", "master_keys": {}}')
    with pytest.raises(KeyfileError, match="cannot read keyfile"):
        RecordStore.open(db, tmp_path / "garbled.key")


def test_rows_moved_between_subjects_fail_authentication(
    store: RecordStore, db: Path, keyfile: Path
) -> None:
    store.ingest(ALICE_RECORDS[:1] + BOB_RECORDS[:1])
    store.close()
    connection = sqlite3.connect(db)
    (alice_row,), (bob_row,) = connection.execute(
        "SELECT sealed_record FROM record_store_records ORDER BY id"
    ).fetchall()
    connection.execute("UPDATE record_store_records SET sealed_record = ? WHERE id = 1", (bob_row,))
    connection.execute(
        "UPDATE record_store_records SET sealed_record = ? WHERE id = 2", (alice_row,)
    )
    connection.commit()
    connection.close()
    with RecordStore.open(db, keyfile) as reopened:
        with pytest.raises(CorruptRecordError, match="row 1 does not decrypt"):
            list(reopened.records())


def test_a_subject_can_be_deleted_while_records_are_being_read(store: RecordStore) -> None:
    many = [
        Record(subject_id=subject, kind="text", text=f"note {i}")
        for i in range(300)
        for subject in (ALICE, BOB)
    ]
    store.ingest(many)
    seen = []
    for record in store.records():
        if not seen:
            store.delete_subject(BOB)
        seen.append(record)
    assert [r for r in seen if r.subject_id == ALICE] == [r for r in many if r.subject_id == ALICE]
    assert store.count() == 300


def test_deleting_some_records_keeps_the_subject_and_all_of_them_shreds_it(
    store: RecordStore, keyfile: Path
) -> None:
    store.ingest(ALICE_RECORDS + BOB_RECORDS)
    text = RecordSelector(kinds=("text",))
    report = store.delete_records(ALICE, text.matches)
    assert report.records_deleted == 1 and report.key_epoch == store.key_epoch == 1
    assert list(store.records(ALICE)) == [r for r in ALICE_RECORDS if r.kind != "text"]
    assert store.subject_ids() == sorted([ALICE, BOB])
    # Picking every remaining record is a deletion of the subject: its key is shredded.
    report = store.delete_records(ALICE, lambda _record: True)
    assert report.records_deleted == 1 and report.key_epoch == store.key_epoch == 2
    assert store.subject_ids() == [BOB]
    with pytest.raises(UnknownSubjectError):
        store.delete_records(ALICE, text.matches)
    assert list(store.records()) == BOB_RECORDS
