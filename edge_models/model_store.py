"""Versioned model store: every published model is an immutable, checksummed HF directory.

Layout under a root (the data directory's `models/`):

    <root>/<name>/<version>/   config.json, model.safetensors, tokenizer files, manifest.json
    <root>/<name>/CURRENT      the number of the current version

A device or coordinator may lose power at any moment, so a version is written
into a temporary directory, flushed to disk, and only then renamed into place;
the pointer is switched last with an atomic replace. A crash therefore leaves
either the old current version or the new one, never a half-written model; the
temporary directory it leaves behind is ignored by readers and removed by the
next publish. The manifest's per-file sha256 lets a reader detect a corrupted
or tampered copy before it trains or serves with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MANIFEST = "manifest.json"
MANIFEST_FIELDS = frozenset({"name", "version", "created_at", "files", "checksum", "metadata"})
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
CHUNK = 1 << 20


class ModelStoreError(Exception):
    """A model store operation failed."""


class ModelNotFoundError(ModelStoreError, LookupError):
    """No such model name or version in the store."""


class ModelIntegrityError(ModelStoreError):
    """A stored version does not match its manifest (corrupted, truncated or altered)."""


@dataclass(frozen=True)
class ModelVersion:
    """One published version; `path` is a Hugging Face model directory."""

    name: str
    version: int
    path: Path
    checksum: str
    metadata: dict[str, Any] = field(hash=False)


def publish(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    root: str | Path,
    name: str,
    metadata: Mapping[str, Any] | None = None,
) -> ModelVersion:
    """Store `model` and `tokenizer` as the next version of `name` and make it current.

    `metadata` (training metrics, provenance) must be JSON; it is checked before
    anything is written so that bad input leaves the store untouched.
    """
    # Imported here so that readers of the store (current, verify) need not load transformers.
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"publish needs a transformers PreTrainedModel, got {type(model).__name__}; "
            "merge LoRA adapters into the base model first"
        )
    model_dir = _model_dir(root, name)
    metadata = dict(metadata or {})
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ModelStoreError(f"metadata for {name!r} is not JSON: {error}") from error
    model_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(model_dir):
        remove_temporaries(model_dir)
        version = max(_version_numbers(model_dir), default=0) + 1
        staging = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=model_dir))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            _write_manifest(staging, name, version, metadata)
            sync_tree(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        final = model_dir / str(version)
        os.rename(staging, final)
        fsync_path(model_dir)
        write_pointer(model_dir, str(version))
    return _read_version(final)


def current(root: str | Path, name: str) -> ModelVersion:
    """The version of `name` that the pointer designates (not verified; see `verify`)."""
    model_dir = _model_dir(root, name)
    text = read_pointer(model_dir)
    if text is None:
        raise ModelNotFoundError(f"no model named {name!r} in {Path(root)}")
    if not text.isdigit():
        raise ModelIntegrityError(
            f"{model_dir / POINTER_NAME} does not hold a version number: {text!r}"
        )
    return get(root, name, int(text))


def get(root: str | Path, name: str, version: int) -> ModelVersion:
    """A specific version of `name` (not verified; see `verify`)."""
    path = _model_dir(root, name) / str(version)
    if not (path / MANIFEST).is_file():
        raise ModelNotFoundError(f"model {name!r} has no version {version} in {Path(root)}")
    stored = _read_version(path)
    if (stored.name, stored.version) != (name, version):
        raise ModelIntegrityError(
            f"{path / MANIFEST} describes {stored.name!r} version {stored.version}, "
            f"not {name!r} version {version}"
        )
    return stored


def verify(version: ModelVersion) -> None:
    """Check every file of `version` against its manifest; raise naming the first bad file."""
    manifest = _read_manifest(version.path)
    expected: dict[str, str] = manifest["files"]
    if _total_checksum(expected) != version.checksum:
        raise ModelIntegrityError(f"{version.path / MANIFEST} has been altered: checksum mismatch")
    present = set(_payload(version.path))
    if missing := sorted(expected.keys() - present):
        raise ModelIntegrityError(f"{', '.join(missing)} missing from {version.path}")
    if unexpected := sorted(present - expected.keys()):
        raise ModelIntegrityError(f"{', '.join(unexpected)} in {version.path} not in its manifest")
    for relative, digest in sorted(expected.items()):
        if _sha256(version.path / relative) != digest:
            raise ModelIntegrityError(
                f"{relative} in {version.path} does not match its manifest checksum"
            )


def resolve_model(spec: str | Path, root: str | Path) -> Path:
    """The directory to load for `spec`: a stored model's current version, or a local directory.

    A stored name takes precedence over a relative directory of the same name.
    Stored versions are verified before use; a directory outside the store is
    returned as is (loading checks that it is a usable model).
    """
    text = str(spec)
    if NAME_PATTERN.fullmatch(text) and (Path(root) / text / POINTER_NAME).is_file():
        stored = current(root, text)
        verify(stored)
        return stored.path
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"{text!r} is neither a model stored in {Path(root)} nor a model directory"
        )
    if (path / MANIFEST).is_file():
        verify(_read_version(path))
    return path.resolve()


def _model_dir(root: str | Path, name: str) -> Path:
    """The folder of one model name; names are single path components so none escapes `root`."""
    if not NAME_PATTERN.fullmatch(name):
        raise ModelStoreError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-', "
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
        raise ModelIntegrityError(f"{MANIFEST} is missing from {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelIntegrityError(f"{path / MANIFEST} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict):
        raise ModelIntegrityError(f"{path / MANIFEST} is not a JSON object")
    if missing := MANIFEST_FIELDS - manifest.keys():
        raise ModelIntegrityError(f"{path / MANIFEST} lacks the fields {sorted(missing)}")
    return manifest


def _read_version(path: Path) -> ModelVersion:
    manifest = _read_manifest(path)
    return ModelVersion(
        name=manifest["name"],
        version=manifest["version"],
        path=path.resolve(),
        checksum=manifest["checksum"],
        metadata=manifest["metadata"],
    )


def _payload(directory: Path) -> list[str]:
    """Relative POSIX paths of every file a version holds, except the manifest itself."""
    return sorted(
        file.relative_to(directory).as_posix()
        for file in directory.rglob("*")
        if file.is_file() and file.name != MANIFEST
    )


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


def _version_numbers(model_dir: Path) -> list[int]:
    # Counting directories, not the pointer: a crash between the rename and the
    # pointer update leaves a complete version whose number must not be reused.
    return [int(entry.name) for entry in model_dir.iterdir() if entry.name.isdigit()]
