"""Crash-safe file operations: the one place that knows how to make a write stick.

A device can lose power at any moment. Everything Lethe persists outside
SQLite (model versions, ONNX exports, adapters, keyfiles, pointers) is written
with these few moves: write into a temporary beside the target, flush it to
disk, rename it into place, flush the directory. A crash leaves the old state
or the new one, never a mix, and the temporaries it leaves are recognisable by
their prefix and removed by the next writer that holds the lock.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"
POINTER_NAME = "CURRENT"


def fsync_path(path: Path) -> None:
    """Flush one file or directory to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sync_tree(directory: Path) -> None:
    """Flush every file and directory under `directory`, so a rename cannot expose lost data."""
    for path in sorted(directory.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(directory)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new content.

    The temporary is created with `mode` before any byte is written, so a key
    file is never readable by others, not even for a moment.
    """
    staged = path.with_name(f"{TEMP_PREFIX}{path.name}")
    staged.unlink(missing_ok=True)
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staged, path)
    fsync_path(path.parent)


def write_pointer(directory: Path, target: str) -> None:
    """Name `target` (an entry of `directory`) as current; readers see the old or new name."""
    atomic_write_bytes(directory / POINTER_NAME, f"{target}\n".encode())


def read_pointer(directory: Path) -> str | None:
    """The entry `write_pointer` last named in `directory`, or None if it never did."""
    try:
        return (directory / POINTER_NAME).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None


def remove_temporaries(directory: Path) -> None:
    """Delete what writers that died left behind; only call while holding the directory's lock."""
    for entry in directory.glob(f"{TEMP_PREFIX}*"):
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


@contextmanager
def exclusive_lock(directory: Path) -> Iterator[None]:
    """One writer per directory at a time; the OS releases the lock if the process dies."""
    with (directory / LOCK_NAME).open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
