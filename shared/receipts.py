"""Signed deletion receipts: the evidence a subject or an auditor can check offline.

A receipt says which request was carried out, for which subject (a keyed
hash, never the id), which model versions it changed and what was measured
afterwards. Its body is canonical JSON (sorted keys, no spaces, UTF-8), so
the same fields always give the same bytes, and it is signed with Ed25519:
small keys and signatures, deterministic, no parameters to get wrong. The
signature covers exactly the canonical body bytes; a receipt file keeps the
body as a JSON object for people to read, and a reader canonicalises it again
before checking, so any change to a field breaks the signature.

Keys: the private key is a PEM file of mode 0600, the public key a PEM file
beside it (`NAME.pub`); `key_id` (the first 16 hex digits of the sha256 of the
raw public key) names the key in every receipt so a verifier can tell which
key to use before trying it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.durable import atomic_write_bytes
from shared.pki import private_key_pem
from shared.records import _no_nan, _object_without_duplicates

FORMAT = "lethe-receipt/1"
TIMESTAMPS = ("received", "verified", "issued")
# What the caller of `sign_receipt` supplies; `format` and `key_id` come from the signer.
SIGNED_FIELDS = (
    "request_id",
    "subject_hash",
    "model_versions_before",
    "model_versions_after",
    "measurements",
    "timestamps",
)
BODY_FIELDS = frozenset({*SIGNED_FIELDS, "format", "key_id"})


class ReceiptError(ValueError):
    """A receipt or key that cannot be trusted: malformed, tampered, or signed by another key."""


@dataclass(frozen=True)
class SignedReceipt:
    """The canonical body bytes, the Ed25519 signature over them and the signing key's id."""

    body: bytes
    signature: bytes
    key_id: str


# -- keys ------------------------------------------------------------------------------------


def public_key_path(private_key_path: Path) -> Path:
    return private_key_path.with_name(private_key_path.name + ".pub")


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_signing_key(path: Path) -> Ed25519PrivateKey:
    """Make a new key: private PEM at `path` (0600), public PEM at `public_key_path(path)`.

    Refuses to overwrite an existing key, since receipts already issued name it.
    """
    if path.exists():
        raise ReceiptError(f"signing key {path} exists; receipts already issued name it")
    key = Ed25519PrivateKey.generate()
    private_pem = private_key_pem(key)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(public_key_path(path), public_pem)
    atomic_write_bytes(path, private_pem, mode=0o600)  # last: its presence means "complete"
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The private key at `path`; refused if other users could read it."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as error:
        raise ReceiptError(f"cannot read signing key {path}: {error}") from error
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ReceiptError(f"signing key {path} is readable by others; chmod 600 it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as error:
        raise ReceiptError(f"{path} holds no usable private key: {error}") from error
    if not isinstance(key, Ed25519PrivateKey):
        raise ReceiptError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def ensure_signing_key(path: Path) -> Ed25519PrivateKey:
    """The key at `path`, generated on first use."""
    return load_signing_key(path) if path.exists() else generate_signing_key(path)


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as error:
        raise ReceiptError(f"cannot load a public key from {path}: {error}") from error
    if not isinstance(key, Ed25519PublicKey):
        raise ReceiptError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


# -- bodies ----------------------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """The one byte form of a JSON value: sorted keys, no spaces, UTF-8, no NaN."""
    try:
        text = json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as error:
        raise ReceiptError(f"receipt fields are not plain JSON: {error}") from error
    return text.encode("utf-8")


def sign_receipt(fields: Mapping[str, Any], key: Ed25519PrivateKey) -> SignedReceipt:
    """Check `fields` (the SIGNED_FIELDS), add `format` and `key_id`, and sign the body."""
    signer = key_id(key.public_key())
    missing = [name for name in SIGNED_FIELDS if name not in fields]
    extra = sorted(set(fields) - BODY_FIELDS)
    if missing or extra:
        raise ReceiptError(f"receipt fields: missing {missing}, unknown {extra}")
    for name, expected in (("format", FORMAT), ("key_id", signer)):
        if fields.get(name, expected) != expected:
            raise ReceiptError(f"receipt field {name} is {fields[name]!r}, not {expected!r}")
    content = {**fields, "format": FORMAT, "key_id": signer}
    _check_content(content)
    body = canonical_json(content)
    return SignedReceipt(body=body, signature=key.sign(body), key_id=signer)


def verify_receipt(signed: SignedReceipt, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """The receipt's fields, once its signature by `public_key` and its body check out."""
    expected = key_id(public_key)
    if signed.key_id != expected:
        raise ReceiptError(f"receipt is signed by key {signed.key_id}, not by {expected}")
    try:
        public_key.verify(signed.signature, signed.body)
    except InvalidSignature as error:
        message = "bad signature: the receipt was changed or signed by another key"
        raise ReceiptError(message) from error
    content = parse_body(signed.body)
    if content["key_id"] != signed.key_id:
        raise ReceiptError(f"receipt body names key {content['key_id']}, not {signed.key_id}")
    return content


def parse_body(body: bytes) -> dict[str, Any]:
    """The fields of a canonical receipt body (not its signature: see `verify_receipt`)."""
    try:
        content = _strict_json(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ReceiptError(f"receipt body is not JSON: {error}") from error
    if not isinstance(content, dict):
        raise ReceiptError("receipt body is not a JSON object")
    if canonical_json(content) != body:
        raise ReceiptError("receipt body is not in canonical form")
    if set(content) != BODY_FIELDS:
        raise ReceiptError(f"receipt body has fields {sorted(content)}, not {sorted(BODY_FIELDS)}")
    if content["format"] != FORMAT:
        raise ReceiptError(f"receipt format {content['format']!r} is not {FORMAT!r}")
    _check_content(content)
    return content


def _check_content(content: Mapping[str, Any]) -> None:
    for name in ("request_id", "subject_hash", "key_id"):
        if not isinstance(content[name], str) or not content[name]:
            raise ReceiptError(f"receipt field {name} must be a non-empty string")
    for name in ("model_versions_before", "model_versions_after", "measurements", "timestamps"):
        if not isinstance(content[name], dict):
            raise ReceiptError(f"receipt field {name} must be an object")
    for name, value in content["measurements"].items():
        if not _is_finite_number(value):
            raise ReceiptError(f"measurement {name!r} is {value!r}, not a finite number")
    timestamps = content["timestamps"]
    if set(timestamps) != set(TIMESTAMPS) or not all(
        _is_finite_number(timestamps[name]) for name in TIMESTAMPS
    ):
        raise ReceiptError(f"receipt timestamps must be numbers named {list(TIMESTAMPS)}")


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _strict_json(text: str) -> Any:
    """Parse JSON as the record reader does: a duplicate key or NaN is refused, not resolved."""
    return json.loads(text, object_pairs_hook=_object_without_duplicates, parse_constant=_no_nan)


# -- receipt files ---------------------------------------------------------------------------


def receipt_file_bytes(signed: SignedReceipt) -> bytes:
    """A receipt file: `{"receipt": {...body...}, "signature": base64, "key_id": ...}`."""
    document = {
        "receipt": parse_body(signed.body),
        "signature": base64.b64encode(signed.signature).decode("ascii"),
        "key_id": signed.key_id,
    }
    return (json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def read_receipt_file(data: bytes) -> SignedReceipt:
    """The signed receipt in a receipt file, its body canonicalised again (then verify it)."""
    try:
        document = _strict_json(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ReceiptError(f"receipt file is not JSON: {error}") from error
    if not isinstance(document, dict) or set(document) != {"receipt", "signature", "key_id"}:
        raise ReceiptError('a receipt file is an object with "receipt", "signature", "key_id"')
    if not isinstance(document["receipt"], dict) or not isinstance(document["key_id"], str):
        raise ReceiptError('"receipt" must be an object and "key_id" a string')
    try:
        signature = base64.b64decode(str(document["signature"]), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ReceiptError(f'"signature" is not base64: {error}') from error
    return SignedReceipt(
        body=canonical_json(document["receipt"]), signature=signature, key_id=document["key_id"]
    )
