"""The device's drop folder: apps leave JSON-lines files, the daemon ingests them.

A writer must make a file appear whole: write `NAME.jsonl.part` (or anywhere
else on the same file system) and rename it to `NAME.jsonl`, so the daemon
never reads a file that is still being written. Each file is ingested all or
nothing by the record store; afterwards it is removed (its records live on
only in the encrypted store, so forgetting a person leaves no plain copy of
them behind), or, if refused, moved to `rejected/` with a
`NAME.jsonl.errors` beside it listing every bad line, so a file is processed
exactly once and nothing it held is silently dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from client.record_store import IngestReport, RecordStore
from shared.durable import atomic_write_bytes
from shared.records import RecordFileError

REJECTED = "rejected"
PATTERN = "*.jsonl"


@dataclass(frozen=True)
class InboxResult:
    """What became of one dropped file: stored (with its report) or rejected (with reasons)."""

    file: Path
    report: IngestReport | None
    errors: tuple[tuple[int, str], ...] = ()

    @property
    def accepted(self) -> bool:
        return self.report is not None


def process_inbox(inbox: Path, store: RecordStore) -> list[InboxResult]:
    """Ingest every complete file in `inbox`, oldest first, and file each away."""
    (inbox / REJECTED).mkdir(parents=True, exist_ok=True)
    files = sorted(inbox.glob(PATTERN), key=lambda f: (f.stat().st_mtime_ns, f.name))
    results = []
    for file in files:
        try:
            report = store.ingest_file(file)
        except RecordFileError as error:
            lines = "".join(f"{line}: {reason}\n" for line, reason in error.errors)
            target = _free_name(inbox / REJECTED, file.name)
            atomic_write_bytes(target.with_name(f"{target.name}.errors"), lines.encode())
            os.replace(file, target)
            results.append(InboxResult(file, None, tuple(error.errors)))
            continue
        # The records are committed; a crash before this removal re-ingests the
        # file next time, which the store's deduplication makes harmless.
        file.unlink()
        results.append(InboxResult(file, report))
    return results


def _free_name(folder: Path, name: str) -> Path:
    """`folder/name`, or `folder/name.N` when an earlier file of that name is already there."""
    target = folder / name
    n = 1
    while target.exists():
        target = folder / f"{name}.{n}"
        n += 1
    return target
