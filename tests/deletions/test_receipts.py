"""Signed receipts (`shared.receipts`): canonical bodies, Ed25519, and every change caught."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from shared.receipts import (
    FORMAT,
    ReceiptError,
    SignedReceipt,
    ensure_signing_key,
    generate_signing_key,
    key_id,
    load_public_key,
    load_signing_key,
    public_key_path,
    read_receipt_file,
    receipt_file_bytes,
    sign_receipt,
    verify_receipt,
)


def fields(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "request_id": "0b9a1f4e-8c1d-4c55-9a39-5f2d3f4a7e10",
        "subject_hash": "9f" * 32,
        "model_versions_before": {"shared": 12, "devices": {"d1": 4, "d2": 7}},
        "model_versions_after": {"shared": 13, "devices": {"d1": 5, "d2": 8}},
        "measurements": {"canary_exposure": 0.015, "forget_exact_match": 0.0, "retain": 0.81},
        "timestamps": {"received": 1_700_000_000.25, "verified": 1_700_000_090.5, "issued": 1.7e9},
    }
    return {**base, **changes}


def test_a_receipt_signs_and_verifies_with_a_canonical_body(tmp_path: Path) -> None:
    key = generate_signing_key(tmp_path / "receipt.key")
    assert stat.S_IMODE((tmp_path / "receipt.key").stat().st_mode) == 0o600
    public = load_public_key(public_key_path(tmp_path / "receipt.key"))
    signed = sign_receipt(fields(), key)
    assert signed.key_id == key_id(public) and len(signed.key_id) == 16
    assert b" " not in signed.body and signed.body.startswith(b'{"format":"lethe-receipt/1"')
    content = verify_receipt(signed, public)
    assert content == {**fields(), "format": FORMAT, "key_id": signed.key_id}
    assert sign_receipt(fields(), key).body == signed.body  # same fields, same bytes

    reread = read_receipt_file(receipt_file_bytes(signed))
    assert reread == signed
    assert verify_receipt(reread, public) == content


def test_any_changed_byte_of_the_body_or_signature_is_caught(tmp_path: Path) -> None:
    key = generate_signing_key(tmp_path / "receipt.key")
    signed = sign_receipt(fields(), key)
    for position in range(len(signed.body)):
        body = bytearray(signed.body)
        body[position] ^= 0x01
        with pytest.raises(ReceiptError):
            verify_receipt(
                SignedReceipt(bytes(body), signed.signature, signed.key_id), key.public_key()
            )
    for position in range(len(signed.signature)):
        signature = bytearray(signed.signature)
        signature[position] ^= 0x80
        with pytest.raises(ReceiptError, match="bad signature"):
            verify_receipt(
                SignedReceipt(signed.body, bytes(signature), signed.key_id), key.public_key()
            )


def test_an_edited_receipt_file_fails_and_a_reformatted_one_still_verifies(tmp_path: Path) -> None:
    key = generate_signing_key(tmp_path / "receipt.key")
    document = json.loads(receipt_file_bytes(sign_receipt(fields(), key)))
    document["receipt"]["measurements"]["canary_exposure"] = 0.0
    edited = read_receipt_file(json.dumps(document).encode())
    with pytest.raises(ReceiptError, match="bad signature"):
        verify_receipt(edited, key.public_key())

    document["receipt"]["measurements"]["canary_exposure"] = 0.015
    compact = json.dumps(document, separators=(",", ":"), sort_keys=False).encode()
    assert verify_receipt(read_receipt_file(compact), key.public_key())["key_id"] == key_id(
        key.public_key()
    )
    duplicated = compact.replace(b'"retain":0.81', b'"retain":0.81,"retain":0.99')
    with pytest.raises(ReceiptError, match="duplicate"):
        read_receipt_file(duplicated)
    document["signature"] = "not base64!"
    with pytest.raises(ReceiptError, match="not base64"):
        read_receipt_file(json.dumps(document).encode())
    with pytest.raises(ReceiptError, match="receipt file is an object"):
        read_receipt_file(b'{"receipt": {}}')


def test_a_receipt_from_another_key_is_refused(tmp_path: Path) -> None:
    ours = generate_signing_key(tmp_path / "ours.key")
    theirs = generate_signing_key(tmp_path / "theirs.key")
    signed = sign_receipt(fields(), theirs)
    with pytest.raises(ReceiptError, match=f"signed by key {signed.key_id}, not by"):
        verify_receipt(signed, ours.public_key())
    forged = SignedReceipt(signed.body, signed.signature, key_id(ours.public_key()))
    with pytest.raises(ReceiptError, match="bad signature"):
        verify_receipt(forged, ours.public_key())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"request_id": ""}, "request_id must be a non-empty string"),
        ({"measurements": {"exposure": float("nan")}}, "not a finite number"),
        ({"measurements": {"exposure": True}}, "not a finite number"),
        ({"timestamps": {"received": 1.0, "verified": 2.0}}, "timestamps"),
        ({"model_versions_after": 13}, "must be an object"),
        ({"format": "lethe-receipt/2"}, "format"),
        ({"extra": 1}, "unknown \\['extra'\\]"),
        ({"key_id": "someone-else"}, "key_id"),
    ],
)
def test_malformed_fields_are_refused_before_signing(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    key = generate_signing_key(tmp_path / "receipt.key")
    with pytest.raises(ReceiptError, match=message):
        sign_receipt(fields(**changes), key)
    incomplete = fields()
    del incomplete["timestamps"]
    with pytest.raises(ReceiptError, match="missing \\['timestamps'\\]"):
        sign_receipt(incomplete, key)


def test_a_validly_signed_but_non_canonical_body_is_refused(tmp_path: Path) -> None:
    key = generate_signing_key(tmp_path / "receipt.key")
    content = {**fields(), "format": FORMAT, "key_id": key_id(key.public_key())}
    loose = json.dumps(content, indent=1).encode()  # signed, but not the canonical bytes
    signed = SignedReceipt(loose, key.sign(loose), key_id(key.public_key()))
    with pytest.raises(ReceiptError, match="canonical"):
        verify_receipt(signed, key.public_key())


def test_signing_keys_are_kept_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "receipt.key"
    first = ensure_signing_key(path)
    again = ensure_signing_key(path)
    assert key_id(first.public_key()) == key_id(again.public_key())
    assert key_id(load_signing_key(path).public_key()) == key_id(
        load_public_key(path.with_name("receipt.key.pub"))
    )
    with pytest.raises(ReceiptError, match="exists"):
        generate_signing_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(ReceiptError, match="chmod 600"):
        load_signing_key(path)
    (tmp_path / "junk.pem").write_bytes(base64.b64encode(b"junk"))
    with pytest.raises(ReceiptError, match="public key"):
        load_public_key(tmp_path / "junk.pem")
