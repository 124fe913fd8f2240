"""Versioned store: immutable, checksummed directories published under a name, one current.

Layout under a root:

    <root>/<name>/<version>/   the files a writer produced, plus manifest.json
    <root>/<name>/CURRENT      the number of the current version
    <root>/<name>/.tmp-*       a version being written, or left by a writer that died

What a version holds (a Hugging Face model, a LoRA adapter) is the caller's
business: it writes the files into a directory it is handed. Everything else
lives here, once. A device may lose power at any moment, so a version is
written into a temporary directory, flushed to disk, and only then renamed into
place; the pointer is switched last with an atomic replace (`shared.durable`).
A crash therefore leaves either the old current version or the new one, never
a half-written one; the temporary it leaves behind is ignored by readers and
removed by the next publish. The manifest's per-file sha256 lets a reader
detect a copy that was corrupted on disk, and `latest_good` falls back to the
newest older version that is still intact instead of using it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.durable import (
    POINTER_NAME,
    TEMP_PREFIX,
    exclusive_lock,
    fsync_path,
    read_pointer,
    remove_temporaries,
    sync_tree,
    write_pointer,
)

MANIFEST = "manifest.json"
MANIFEST_FIELDS = frozenset({"name", "version", "created_at", "files", "checksum", "metadata"})
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
CHUNK = 1 << 20

log = logging.getLogger(__name__)


class StoreError(Exception):
    """A versioned store operation failed."""


class NotFoundError(StoreError, LookupError):
    """No such name or version in the store."""


class IntegrityError(StoreError):
    """A stored version does not match its manifest (corrupted, truncated or altered)."""


@dataclass(frozen=True)
class StoredVersion:
    """One published version; `path` is the directory holding its files."""

    name: str
    version: int
    path: Path
    checksum: str
    metadata: dict[str, Any] = field(hash=False)


def publish_directory(
    root: str | Path,
    name: str,
    write: Callable[[Path], None],
    metadata: Mapping[str, Any] | None = None,
    *,
    keep: int | None = None,
    kind: str = "entry",
) -> StoredVersion:
    """Store what `write` puts into the directory it is given as the next version of `name`.

    The new version becomes current. `metadata` must be JSON; it and `name` are
    checked before anything is written, so bad input leaves the store
    untouched. With `keep`, only the newest `keep` versions survive, the new
    current one among them. `kind` ("model", "adapter") names what is stored in error messages.
    """
    directory = _entry_dir(root, name, kind)
    metadata = dict(metadata or {})
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise StoreError(f"metadata for {name!r} is not JSON: {error}") from error
    if keep is not None and keep < 1:
        raise StoreError(f"keep must be at least 1 (the current version), got {keep}")
    directory.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(directory):
        remove_temporaries(directory)
        version = max(_version_numbers(directory), default=0) + 1
        staging = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=directory))
        try:
            write(staging)
            if (staging / MANIFEST).exists():
                raise StoreError(f"{MANIFEST} is reserved for the store; the writer produced one")
            _write_manifest(staging, name, version, metadata)
            sync_tree(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        final = directory / str(version)
        os.rename(staging, final)
        fsync_path(directory)
        write_pointer(directory, str(version))
        if keep is not None:
            _prune(directory, keep)
    return read_version(final)


def current(root: str | Path, name: str, *, kind: str = "entry") -> StoredVersion:
    """The version of `name` that the pointer designates (not verified; see `verify`)."""
    directory = _entry_dir(root, name, kind)
    return get(root, name, _current_number(directory, name, kind), kind=kind)


def get(root: str | Path, name: str, version: int, *, kind: str = "entry") -> StoredVersion:
    """A specific version of `name` (not verified; see `verify`)."""
    path = _entry_dir(root, name, kind) / str(version)
    if not path.is_dir():
        raise NotFoundError(f"{kind} {name!r} has no version {version} in {Path(root)}")
    stored = read_version(path)
    if (stored.name, stored.version) != (name, version):
        raise IntegrityError(
            f"{path / MANIFEST} describes {stored.name!r} version {stored.version}, "
            f"not {name!r} version {version}"
        )
    return stored


def versions(root: str | Path, name: str, *, kind: str = "entry") -> list[int]:
    """Numbers of the versions of `name` on disk, oldest first (none verified).

    May include a version newer than the current one: a writer that died
    between renaming it into place and switching the pointer leaves it behind.
    """
    directory = _entry_dir(root, name, kind)
    if not directory.is_dir():
        raise NotFoundError(f"no {kind} named {name!r} in {Path(root)}")
    return sorted(_version_numbers(directory))


def verify(version: StoredVersion) -> None:
    """Check every file of `version` against its manifest; raise naming the first bad file."""
    manifest = _read_manifest(version.path)
    expected: dict[str, str] = manifest["files"]
    if _total_checksum(expected) != version.checksum:
        raise IntegrityError(f"{version.path / MANIFEST} has been altered: checksum mismatch")
    present = set(_payload(version.path))
    if missing := sorted(expected.keys() - present):
        raise IntegrityError(f"{', '.join(missing)} missing from {version.path}")
    if unexpected := sorted(present - expected.keys()):
        raise IntegrityError(f"{', '.join(unexpected)} in {version.path} not in its manifest")
    for relative, digest in sorted(expected.items()):
        if _sha256(version.path / relative) != digest:
            raise IntegrityError(
                f"{relative} in {version.path} does not match its manifest checksum"
            )


def read_version(path: Path) -> StoredVersion:
    """The version a directory's manifest describes, wherever it lies (not verified)."""
    manifest = _read_manifest(path)
    return StoredVersion(
        name=manifest["name"],
        version=manifest["version"],
        path=path.resolve(),
        checksum=manifest["checksum"],
        metadata=manifest["metadata"],
    )


def latest_good(root: str | Path, name: str, *, kind: str = "entry") -> StoredVersion:
    """The current version if it verifies, else the newest older one that does.

    A bit flipped on disk must not stop a device from working, nor make it use
    damaged weights: each version that fails is logged with the reason (which
    names the bad file) and skipped. Versions newer than the current one were
    never committed and are not considered. Raises `IntegrityError` listing
    every failure when no version is intact.
    """
    directory = _entry_dir(root, name, kind)
    try:
        pointed: int | None = _current_number(directory, name, kind)
    except IntegrityError as error:
        # The pointer itself is damaged: every version on disk is a candidate.
        log.warning("%s; trying every stored version of %s %r", error, kind, name)
        pointed = None
    older = [
        number for number in versions(root, name, kind=kind) if pointed is None or number < pointed
    ]
    candidates = ([] if pointed is None else [pointed]) + older[::-1]
    failures: list[str] = []
    for number in candidates:
        try:
            stored = get(root, name, number, kind=kind)
            verify(stored)
        except StoreError as error:
            log.warning("%s %r version %d is unusable: %s", kind, name, number, error)
            failures.append(f"version {number}: {error}")
            continue
        return stored
    raise IntegrityError(
        f"no intact version of {kind} {name!r} in {Path(root)}: " + "; ".join(failures)
    )


def _prune(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` versions; call holding the lock, right after a publish.

    The version just published is the newest (numbers only grow), so the
    current version is always kept. Each doomed version is first renamed to a
    temporary name: a crash in the middle of deleting it would otherwise leave
    a half-deleted directory under a version number, while a temporary is just
    removed by the next writer.
    """
    for number in sorted(_version_numbers(directory), reverse=True)[keep:]:
        trash = directory / f"{TEMP_PREFIX}pruned-{number}"
        os.rename(directory / str(number), trash)
        fsync_path(directory)
        shutil.rmtree(trash)


def _current_number(directory: Path, name: str, kind: str) -> int:
    text = read_pointer(directory)
    if text is None:
        raise NotFoundError(f"no {kind} named {name!r} in {directory.parent}")
    if not text.isdigit():
        raise IntegrityError(f"{directory / POINTER_NAME} does not hold a version number: {text!r}")
    return int(text)


def _entry_dir(root: str | Path, name: str, kind: str) -> Path:
    """The folder of one name; names are single path components so none escapes `root`."""
    if not NAME_PATTERN.fullmatch(name):
        raise StoreError(
            f"invalid {kind} name {name!r}: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return Path(root) / name


def _write_manifest(staging: Path, name: str, version: int, metadata: dict[str, Any]) -> None:
    files = {relative: _sha256(staging / relative) for relative in _payload(staging)}
    manifest = {
        "name": name,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": files,
        "checksum": _total_checksum(files),
        "metadata": metadata,
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IntegrityError(f"{MANIFEST} is missing from {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IntegrityError(f"{path / MANIFEST} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{path / MANIFEST} is not a JSON object")
    if missing := MANIFEST_FIELDS - manifest.keys():
        raise IntegrityError(f"{path / MANIFEST} lacks the fields {sorted(missing)}")
    return manifest


def _payload(directory: Path) -> list[str]:
    """Relative POSIX paths of every file a version holds, except its own manifest."""
    relatives = (
        file.relative_to(directory).as_posix() for file in directory.rglob("*") if file.is_file()
    )
    return sorted(relative for relative in relatives if relative != MANIFEST)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _total_checksum(files: Mapping[str, str]) -> str:
    """One digest over all (path, digest) pairs: identifies a version's whole content."""
    canonical = json.dumps(dict(sorted(files.items())), separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _version_numbers(directory: Path) -> list[int]:
    # Counting directories, not the pointer: a crash between the rename and the
    # pointer update leaves a complete version whose number must not be reused.
    return [int(entry.name) for entry in directory.iterdir() if entry.name.isdigit()]
