"""The crypto helpers: what opens, and that everything else does not."""

from __future__ import annotations

import hashlib

import pytest

from shared import crypto


def test_encrypt_round_trips_and_uses_a_fresh_nonce_each_time() -> None:
    key = crypto.new_key()
    first = crypto.encrypt(key, b"secret", b"ctx")
    second = crypto.encrypt(key, b"secret", b"ctx")
    assert first != second
    assert crypto.decrypt(key, first, b"ctx") == crypto.decrypt(key, second, b"ctx") == b"secret"
    assert b"secret" not in first


def test_decrypt_refuses_wrong_key_wrong_context_tampering_and_short_input() -> None:
    key = crypto.new_key()
    sealed = crypto.encrypt(key, b"secret", b"ctx")
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    attempts = [
        (crypto.new_key(), sealed, b"ctx"),
        (key, sealed, b"other"),
        (key, flipped, b"ctx"),
        (key, sealed[:20], b"ctx"),
    ]
    for attempt_key, attempt, aad in attempts:
        with pytest.raises(crypto.DecryptionError):
            crypto.decrypt(attempt_key, attempt, aad)


def test_wrapped_key_opens_only_under_its_kek_and_context() -> None:
    kek, key = crypto.new_key(), crypto.new_key()
    wrapped = crypto.wrap_key(kek, key, b"epoch 1")
    assert crypto.unwrap_key(kek, wrapped, b"epoch 1") == key
    with pytest.raises(crypto.DecryptionError):
        crypto.unwrap_key(kek, wrapped, b"epoch 2")
    with pytest.raises(crypto.DecryptionError):
        crypto.unwrap_key(crypto.new_key(), wrapped, b"epoch 1")


def test_only_full_size_keys_are_wrapped_or_unwrapped() -> None:
    kek = crypto.new_key()
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.wrap_key(kek, b"short", b"")
    with pytest.raises(crypto.DecryptionError, match="expected 32"):
        crypto.unwrap_key(kek, crypto.encrypt(kek, b"short", b""), b"")


def test_associated_data_cannot_be_confused_by_moving_a_boundary() -> None:
    assert crypto.associated_data(b"ab", b"c") != crypto.associated_data(b"a", b"bc")
    assert crypto.associated_data(b"a", b"") != crypto.associated_data(b"a")


def test_derived_keys_are_deterministic_and_separate_per_purpose() -> None:
    root = crypto.new_key()
    assert crypto.derive_key(root, b"a") == crypto.derive_key(root, b"a")
    assert crypto.derive_key(root, b"a") != crypto.derive_key(root, b"b")
    assert crypto.derive_key(root, b"a") != crypto.derive_key(crypto.new_key(), b"a")
    assert len(crypto.derive_key(root, b"a")) == crypto.KEY_BYTES


def test_subject_hash_depends_on_the_device_secret_and_is_not_a_plain_hash() -> None:
    secret = crypto.new_key()
    digest = crypto.subject_hash(secret, "alice")
    assert digest == crypto.subject_hash(secret, "alice")
    assert digest != crypto.subject_hash(secret, "bob")
    assert digest != crypto.subject_hash(crypto.new_key(), "alice")
    assert digest != hashlib.sha256(b"alice").hexdigest()


def test_keyed_hash_domains_keep_uses_apart() -> None:
    key = crypto.new_key()
    assert crypto.keyed_hash(key, b"one", b"x") != crypto.keyed_hash(key, b"two", b"x")
    assert crypto.subject_hash(key, "x") == crypto.keyed_hash(key, crypto.SUBJECT_HASH_DOMAIN, b"x")


def test_new_keys_are_full_size_and_distinct() -> None:
    keys = {crypto.new_key() for _ in range(8)}
    assert len(keys) == 8
    assert all(len(key) == crypto.KEY_BYTES for key in keys)
