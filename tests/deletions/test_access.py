"""Per-app tokens: only hashes on disk, a private file, globs that bound what an app owns."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from coordinator.deletions.access import (
    Grant,
    Scope,
    TokenFileError,
    TokenRegistry,
    add_token,
    load_grants,
    token_digest,
)
from shared.auth import bearer_metadata


def test_the_tokens_file_keeps_only_hashes_and_is_private(tokens_file: Path) -> None:
    notes = add_token(tokens_file, "notes", Scope.APP, ["notes:*"])
    ops = add_token(tokens_file, "ops", Scope.OPERATOR)
    text = tokens_file.read_text()
    assert notes not in text and ops not in text and len(notes) >= 40
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600
    grants = load_grants(tokens_file)
    assert grants[token_digest(notes)] == Grant("notes", Scope.APP, ("notes:*",))
    assert grants[token_digest(ops)].scope is Scope.OPERATOR

    registry = TokenRegistry(tokens_file)
    assert registry.from_metadata(bearer_metadata(notes)) == grants[token_digest(notes)]
    assert registry.from_metadata(bearer_metadata(notes + "x")) is None
    assert registry.from_metadata((("authorization", notes),)) is None  # no scheme
    assert registry.from_metadata(None) is None


def test_a_file_others_can_read_or_a_malformed_one_is_refused(tokens_file: Path) -> None:
    add_token(tokens_file, "notes", Scope.APP, ["notes:*"])
    os.chmod(tokens_file, 0o640)
    with pytest.raises(TokenFileError, match="chmod 600"):
        load_grants(tokens_file)
    with pytest.raises(TokenFileError, match="chmod 600"):
        add_token(tokens_file, "mail", Scope.APP, ["mail:*"])
    os.chmod(tokens_file, 0o600)
    good = tokens_file.read_text()
    for broken in (
        "{",
        '{"tokens": [{"sha256": "ab", "app": "x", "scope": "app", "subjects": ["x:*"]}]}',
        good.replace('"app"', '"root"', 1).replace('"scope": "app"', '"scope": "root"'),
        json.dumps({"tokens": [{"sha256": "0" * 64, "app": "x", "scope": "app"}]}),
    ):
        tokens_file.write_text(broken)
        with pytest.raises(TokenFileError):
            load_grants(tokens_file)
    with pytest.raises(TokenFileError, match="cannot read"):
        TokenRegistry(tokens_file.with_name("missing.json"))


@pytest.mark.parametrize(
    ("app", "scope", "subjects", "message"),
    [
        ("notes", Scope.APP, [], "needs at least one subject pattern"),
        ("ops", Scope.OPERATOR, ["*"], "give it no patterns"),
        ("../etc", Scope.APP, ["x"], "app name"),
        ("", Scope.APP, ["x"], "app name"),
        ("notes", Scope.APP, [""], "non-empty"),
    ],
)
def test_unusable_grants_are_refused_and_nothing_is_stored(
    tokens_file: Path, app: str, scope: Scope, subjects: list[str], message: str
) -> None:
    with pytest.raises(TokenFileError, match=message):
        add_token(tokens_file, app, scope, subjects)
    assert not tokens_file.exists()


def test_subject_globs_are_case_sensitive_and_bound_an_apps_reach() -> None:
    notes = Grant("notes", Scope.APP, ("notes:*", "legacy-[0-9]"))
    assert notes.may_submit("notes:alice") and notes.may_submit("legacy-7")
    assert not notes.may_submit("NOTES:alice") and not notes.may_submit("legacy-77")
    assert not notes.may_submit("mail:notes:alice")
    assert notes.sees("notes") and not notes.sees("mail") and notes.listed_app == "notes"
    ops = Grant("ops", Scope.OPERATOR)
    assert ops.may_submit("anything") and ops.sees("mail") and ops.listed_app is None
