"""Versioned store: publish, fallback to the last good version, pruning, a real SIGKILL."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.versioned_store import (
    IntegrityError,
    NotFoundError,
    StoreError,
    current,
    get,
    latest_good,
    publish_directory,
    verify,
    versions,
)

NAME = "thing"


def files(contents: dict[str, bytes]) -> Callable[[Path], None]:
    """A writer that puts `contents` (relative path -> bytes) into the staging directory."""

    def write(directory: Path) -> None:
        for relative, data in contents.items():
            (directory / relative).parent.mkdir(parents=True, exist_ok=True)
            (directory / relative).write_bytes(data)

    return write


def flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


def test_round_trip_versions_increase_and_identical_content_has_one_checksum(
    tmp_path: Path,
) -> None:
    first = publish_directory(tmp_path, NAME, files({"a.bin": b"one", "sub/b.txt": b"x"}), {"n": 1})
    second = publish_directory(tmp_path, NAME, files({"a.bin": b"two", "sub/b.txt": b"x"}))
    third = publish_directory(tmp_path, NAME, files({"a.bin": b"one", "sub/b.txt": b"x"}))

    assert [first.version, second.version, third.version] == [1, 2, 3]
    assert versions(tmp_path, NAME) == [1, 2, 3]
    assert current(tmp_path, NAME) == third == latest_good(tmp_path, NAME)
    assert get(tmp_path, NAME, 1) == first
    assert (first.metadata, second.metadata) == ({"n": 1}, {})
    assert first.checksum == third.checksum != second.checksum
    assert (first.path / "sub" / "b.txt").read_bytes() == b"x"
    manifest = json.loads((second.path / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["a.bin", "sub/b.txt"]
    for stored in (first, second, third):
        verify(stored)


def test_corrupt_current_falls_back_to_newest_good_older_version_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for payload in (b"one", b"two", b"three"):
        publish_directory(tmp_path, NAME, files({"weights.bin": payload * 100}))
    flip_byte(tmp_path / NAME / "3" / "weights.bin")
    (tmp_path / NAME / "2" / "weights.bin").unlink()

    with caplog.at_level(logging.WARNING, logger="shared.versioned_store"):
        chosen = latest_good(tmp_path, NAME)

    assert chosen.version == 1
    assert (chosen.path / "weights.bin").read_bytes() == b"one" * 100
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2
    assert "version 3" in warnings[0] and "weights.bin" in warnings[0]
    assert "version 2" in warnings[1] and "weights.bin missing" in warnings[1]
    # The pointer is not moved: repairing or republishing is the writer's call.
    assert current(tmp_path, NAME).version == 3


def test_uncommitted_newer_version_is_never_a_fallback(tmp_path: Path) -> None:
    """A version renamed into place whose pointer switch never happened was not committed."""
    publish_directory(tmp_path, NAME, files({"w": b"one"}))
    second = publish_directory(tmp_path, NAME, files({"w": b"two"}))
    shutil.copytree(second.path, tmp_path / NAME / "3")
    (tmp_path / NAME / "3" / "manifest.json").write_text(
        (second.path / "manifest.json").read_text().replace('"version": 2', '"version": 3')
    )
    flip_byte(second.path / "w")

    assert latest_good(tmp_path, NAME).version == 1


def test_damaged_pointer_falls_back_to_the_newest_good_version(tmp_path: Path) -> None:
    publish_directory(tmp_path, NAME, files({"w": b"one"}))
    publish_directory(tmp_path, NAME, files({"w": b"two"}))
    (tmp_path / NAME / "CURRENT").write_text("garbage\n")

    with pytest.raises(IntegrityError, match=r"CURRENT does not hold a version number"):
        current(tmp_path, NAME)
    assert latest_good(tmp_path, NAME).version == 2


def test_no_good_version_is_a_clear_error_listing_every_failure(tmp_path: Path) -> None:
    publish_directory(tmp_path, NAME, files({"w": b"one"}))
    publish_directory(tmp_path, NAME, files({"w": b"two"}))
    flip_byte(tmp_path / NAME / "1" / "w")
    (tmp_path / NAME / "2" / "manifest.json").write_text("{")

    with pytest.raises(IntegrityError, match=r"no intact version of entry 'thing'") as caught:
        latest_good(tmp_path, NAME)
    assert "version 2: " in str(caught.value) and "not valid JSON" in str(caught.value)
    assert "version 1: w in " in str(caught.value)
    with pytest.raises(NotFoundError, match=r"no entry named 'absent'"):
        latest_good(tmp_path, "absent")


def test_pruning_keeps_the_newest_k_and_the_current_one(tmp_path: Path) -> None:
    for payload in (b"1", b"2", b"3"):
        publish_directory(tmp_path, NAME, files({"w": payload}), keep=2)
        assert len(versions(tmp_path, NAME)) <= 2
    assert versions(tmp_path, NAME) == [2, 3]
    # A version a crash left uncommitted counts among the newest, never above current.
    shutil.copytree(tmp_path / NAME / "3", tmp_path / NAME / "4")

    newest = publish_directory(tmp_path, NAME, files({"w": b"5"}), keep=2)

    assert newest.version == 5
    assert versions(tmp_path, NAME) == [4, 5]
    assert current(tmp_path, NAME) == newest
    verify(newest)
    assert [entry.name for entry in (tmp_path / NAME).glob(".tmp-*")] == []


def test_bad_input_and_failing_writers_change_nothing(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"not JSON"):
        publish_directory(tmp_path, NAME, files({"w": b""}), {"loss": float("nan")})
    with pytest.raises(StoreError, match=r"invalid entry name"):
        publish_directory(tmp_path, "../escape", files({"w": b""}))
    with pytest.raises(StoreError, match=r"keep must be at least 1"):
        publish_directory(tmp_path, NAME, files({"w": b""}), keep=0)
    assert list(tmp_path.iterdir()) == []

    first = publish_directory(tmp_path, NAME, files({"w": b"one"}))

    def failing(directory: Path) -> None:
        (directory / "w").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match=r"disk full"):
        publish_directory(tmp_path, NAME, failing)
    with pytest.raises(StoreError, match=r"manifest\.json is reserved"):
        publish_directory(tmp_path, NAME, files({"manifest.json": b"{}"}))
    assert current(tmp_path, NAME) == first
    assert versions(tmp_path, NAME) == [1]
    assert list((tmp_path / NAME).glob(".tmp-*")) == []


CRASHING_PUBLISH = textwrap.dedent(
    """
    import os, signal, sys
    from shared.versioned_store import publish_directory

    root, name, event, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    seen = 0


    def kill_at(happening, args):
        # SIGKILL just before the nth `event` on a path in the store (the nth rename, say).
        global seen
        if happening == event and str(args[0]).startswith(root):
            seen += 1
            if seen == nth:
                os.kill(os.getpid(), signal.SIGKILL)


    def write(directory):
        (directory / "w").write_bytes(b"two")
        kill_at("written", [directory])


    sys.addaudithook(kill_at)
    publish_directory(root, name, write, keep=1)
    """
)


@pytest.mark.parametrize(
    ("event", "nth", "current_content", "next_version"),
    [
        pytest.param("written", 1, b"one", 2, id="payload written, no manifest yet"),
        pytest.param("os.rename", 1, b"one", 2, id="complete, before the rename into place"),
        # os.replace reports itself as os.rename: the second one switches the pointer.
        pytest.param("os.rename", 2, b"one", 3, id="in place, before the pointer switch"),
        pytest.param("os.rename", 3, b"two", 3, id="current, before pruning the old version"),
        pytest.param("shutil.rmtree", 1, b"two", 3, id="current, old version half pruned"),
    ],
)
def test_publish_killed_at_each_step_leaves_an_intact_current_version(
    tmp_path: Path, event: str, nth: int, current_content: bytes, next_version: int
) -> None:
    """A real SIGKILL, delivered by an audit hook right before one step of the protocol."""
    publish_directory(tmp_path, NAME, files({"w": b"one"}))

    child = subprocess.run(
        [sys.executable, "-c", CRASHING_PUBLISH, str(tmp_path), NAME, event, str(nth)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert child.returncode == -signal.SIGKILL, child.stderr
    in_use = current(tmp_path, NAME)
    verify(in_use)
    assert latest_good(tmp_path, NAME) == in_use
    assert (in_use.path / "w").read_bytes() == current_content

    following = publish_directory(tmp_path, NAME, files({"w": b"three"}), keep=1)

    assert following.version == next_version
    assert versions(tmp_path, NAME) == [next_version]
    assert list((tmp_path / NAME).glob(".tmp-*")) == []
