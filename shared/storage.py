"""Recognising a data directory that cannot be written: a full disk, a read-only mount.

Such a failure is the operator's to fix, not a bug, so every entry point
turns it into one clear line (what failed and what to do) instead of a
traceback, and a service answers its caller with a retryable error. The stores
themselves need nothing more: SQLite and the atomic-rename protocols of
`shared.durable` already leave the old state whole when a write fails, which
the fault-injection tests check.
"""

from __future__ import annotations

import errno
import sqlite3

FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
SQLITE_FULL = ("database or disk is full", "disk i/o error")
SQLITE_READ_ONLY = ("attempt to write a readonly database", "unable to open database file")


def storage_problem(error: BaseException) -> str | None:
    """What is wrong with the storage behind `error` (or its causes), or None if the error is
    something else."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in FULL:
            where = current.filename or "a file"
            return f"the disk is full ({current.strerror}: {where}); free some space"
        if isinstance(current, OSError) and current.errno in READ_ONLY:
            where = current.filename or "the data directory"
            return f"cannot write {where} ({current.strerror}); make the data directory writable"
        if isinstance(current, sqlite3.OperationalError):
            text = str(current).lower()
            if any(marker in text for marker in SQLITE_FULL):
                return f"a database cannot grow ({current}): is the disk full? free some space"
            if any(marker in text for marker in SQLITE_READ_ONLY):
                return f"a database cannot be written ({current}): make its directory writable"
        wrapped = getattr(current, "orig", None)  # SQLAlchemy keeps the driver's error here
        current = (
            wrapped
            if isinstance(wrapped, BaseException)
            else (current.__cause__ or current.__context__)
        )
    return None
