"""Which subjects a device holds, announced without naming them.

A device announces a random salt of its own and, per subject, sha256(salt ||
subject id). The coordinator, given a deletion request for a subject id,
computes the same hash with each device's salt and finds the holders; an
observer of the announcements learns neither the ids nor whether two devices
hold the same person (their salts differ).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from shared.durable import atomic_write_bytes

SALT_BYTES = 16
_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class Holdings:
    """One device's announcement: its salt and the hash of every subject it holds."""

    salt: str
    subject_hashes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not is_salt(self.salt):
            raise ValueError(f"a salt is {2 * SALT_BYTES} hex digits")
        if not all(is_subject_hash(h) for h in self.subject_hashes):
            raise ValueError("a subject hash is 64 hex digits")


def subject_hash(salt: str, subject_id: str) -> str:
    """The announced form of `subject_id` under a device's hex `salt`."""
    return hashlib.sha256(bytes.fromhex(salt) + subject_id.encode("utf-8")).hexdigest()


def is_subject_hash(text: str) -> bool:
    return len(text) == 64 and bool(_HEX.match(text))


def is_salt(text: str) -> bool:
    return len(text) == 2 * SALT_BYTES and bool(_HEX.match(text))


def ensure_salt(path: Path) -> str:
    """The device's announcement salt (hex), created once and kept (mode 0600)."""
    if path.exists():
        salt = path.read_text(encoding="ascii").strip()
        if not is_salt(salt):
            raise ValueError(f"{path} holds no usable salt; remove it to make a new one")
        return salt
    salt = secrets.token_hex(SALT_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, salt.encode("ascii"), mode=0o600)
    return salt
