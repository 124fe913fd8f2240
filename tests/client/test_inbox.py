"""The drop folder: complete files are ingested once and removed; bad ones are explained."""

from __future__ import annotations

from pathlib import Path

from client.inbox import REJECTED, process_inbox
from client.record_store import RecordStore


def test_files_are_ingested_once_and_bad_ones_rejected_with_reasons(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.jsonl").write_text('{"subject_id": "s1", "text": "hello"}\n')
    (inbox / "b.jsonl").write_text('{"subject_id": "s2", "text": "ok"}\n{"subject_id": "s2"}\n')
    (inbox / "c.jsonl.part").write_text('{"subject_id": "s3", "text": "still being written')
    with RecordStore.open(tmp_path / "r.db", tmp_path / "k.key") as store:
        results = process_inbox(inbox, store)
        assert [(r.file.name, r.accepted) for r in results] == [
            ("a.jsonl", True),
            ("b.jsonl", False),
        ]
        assert store.count() == 1  # nothing of b, nothing of the unfinished c
        assert not (inbox / "a.jsonl").exists()  # no plain copy left beside the store
        assert (inbox / REJECTED / "b.jsonl").exists()
        assert "2:" in (inbox / REJECTED / "b.jsonl.errors").read_text()
        assert (inbox / "c.jsonl.part").exists()
        assert process_inbox(inbox, store) == []  # each file is processed once

        # The same name dropped again is a new file: ingested (its record is a
        # duplicate, skipped).
        (inbox / "a.jsonl").write_text('{"subject_id": "s1", "text": "hello"}\n')
        (again,) = process_inbox(inbox, store)
        assert again.report is not None and again.report.duplicates == 1
        assert store.count() == 1 and not (inbox / "a.jsonl").exists()
