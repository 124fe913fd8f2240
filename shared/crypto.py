"""Small symmetric-crypto helpers that the record store and the coordinator share.

Everything here is a pure function of its arguments (apart from drawing random
keys and nonces), so the key hierarchy built on top of it can be tested without
files or databases. AES-256-GCM is used for both data and key wrapping because
it authenticates associated data: a ciphertext or wrapped key only opens in
the exact context (subject, row, key epoch) it was sealed for, so rows cannot
be swapped between subjects or replayed under another epoch.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
SUBJECT_HASH_DOMAIN = b"lethe/subject-hash/v1"


class DecryptionError(Exception):
    """A ciphertext did not authenticate: wrong key, wrong context, or tampered bytes."""


def new_key() -> bytes:
    """A fresh random 256-bit key."""
    return os.urandom(KEY_BYTES)


def associated_data(*parts: bytes) -> bytes:
    """Encode context fields as associated data that no other field list can collide with.

    Each part is length-prefixed, so ("ab", "c") and ("a", "bc") give different bytes.
    """
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Seal plaintext as nonce || ciphertext || tag.

    Nonces are random: keys here are per subject or per epoch and seal far fewer
    than the 2**32 messages where random 96-bit nonces start to risk collision.
    """
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Open what `encrypt` sealed, or raise DecryptionError."""
    if len(sealed) < NONCE_BYTES + 16:
        raise DecryptionError("ciphertext is too short to hold a nonce and a tag")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise DecryptionError("ciphertext did not authenticate") from exc


def wrap_key(kek: bytes, key: bytes, aad: bytes) -> bytes:
    """Seal a data key under a key-encryption key, bound to its context by `aad`."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a data key has {KEY_BYTES} bytes, got {len(key)}")
    return encrypt(kek, key, aad)


def unwrap_key(kek: bytes, wrapped: bytes, aad: bytes) -> bytes:
    """Open a key sealed by `wrap_key`, or raise DecryptionError."""
    key = decrypt(kek, wrapped, aad)
    if len(key) != KEY_BYTES:
        raise DecryptionError(f"unwrapped key has {len(key)} bytes, expected {KEY_BYTES}")
    return key


def derive_key(root: bytes, purpose: bytes) -> bytes:
    """Derive an independent key for one purpose, so one root key never serves two uses."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=purpose).derive(root)


def keyed_hash(key: bytes, domain: bytes, data: bytes) -> str:
    """HMAC-SHA256 of data, separated by domain so hashes for different uses never match."""
    return hmac.new(key, associated_data(domain, data), hashlib.sha256).hexdigest()


def subject_hash(device_secret: bytes, subject_id: str) -> str:
    """The name under which a subject is stored: unlinkable to the id without the secret."""
    return keyed_hash(device_secret, SUBJECT_HASH_DOMAIN, subject_id.encode("utf-8"))
