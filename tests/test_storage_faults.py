"""A full disk and a read-only data directory, injected into real `lethe` processes: a clear
one-line error, no traceback, and nothing stored before is damaged or lost.

The disk fills through the process's own file-size limit (RLIMIT_FSIZE, with SIGXFSZ
ignored, so writes fail as on a full disk). Read-only is the data directory's mode bits;
running as root, the child also gives up the capabilities that let root ignore them
(CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER), so the kernel enforces the bits."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from client.record_store import RecordStore
from coordinator.deletions.access import Scope, add_token
from coordinator.deletions.client import DeletionClient
from coordinator.deletions.layout import ApiFiles
from coordinator.deletions.store import DeletionStore
from edge_models.corpus import build_corpus, device_stream, partition
from lethe.fleet.processes import wait_until
from shared.flower_cli import free_port
from shared.paths import DataDir
from shared.pki import CertFiles, init_folder

LETHE = Path(sys.executable).parent / "lethe"
PR_CAPBSET_DROP = 24
DAC_CAPABILITIES = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER


def disk_full_at(max_bytes: int) -> Callable[[], None]:
    """A preexec hook: no file of the child may grow past `max_bytes`."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return limit


def obeying_mode_bits() -> None:
    """A preexec hook: a root child loses the capabilities that bypass file modes."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in DAC_CAPABILITIES:
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def lethe(*args: str, fault: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LETHE), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=fault,
        restore_signals=False,  # keep SIGXFSZ ignored across exec
        env={**os.environ, "COLUMNS": "200"},
    )


def clear_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit code 1, one `error:` line naming the problem, no traceback."""
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "╭" not in done.stderr, done.stderr
    assert done.stderr.startswith("error:"), done.stderr
    assert all(word in done.stderr for word in words), done.stderr


def records_file(folder: Path, name: str, start: int, stop: int) -> Path:
    corpus = build_corpus(0)
    stream = device_stream(corpus, partition(corpus, 3, seed=0)[0], seed=0)
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in stream[start:stop]))
    return path


def device_state(data: DataDir) -> tuple[int, list[str]]:
    """How many records the device holds and whose, read through the store itself, and the
    database's own integrity check."""
    with closing(sqlite3.connect(data.record_db)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with RecordStore.open(data.record_db, data.master_key) as store:
        subjects = sorted(store.subject_ids())
        assert all(store.count(s) > 0 for s in subjects)  # every record still decrypts
        return store.count(), subjects


@pytest.fixture
def device(tmp_path: Path) -> DataDir:
    """A device data directory holding its first 40 records."""
    data = DataDir(tmp_path / "data")
    done = lethe(
        "client",
        "ingest",
        str(records_file(tmp_path, "first", 0, 40)),
        "--data-dir",
        str(data.root),
    )
    assert done.returncode == 0, done.stderr
    return data


def test_a_full_disk_refuses_an_ingest_and_a_deletion_cleanly(
    device: DataDir, tmp_path: Path
) -> None:
    before = device_state(device)
    more = records_file(tmp_path, "more", 40, 400)
    size = device.record_db.stat().st_size
    clear_error(
        lethe(
            "client", "ingest", str(more), "--data-dir", str(device.root), fault=disk_full_at(size)
        ),
        "free some space",
    )
    assert device_state(device) == before  # all or nothing: nothing of the file was kept

    victim = before[1][0]
    clear_error(
        lethe(
            "client",
            "delete-subject",
            victim,
            "--data-dir",
            str(device.root),
            fault=disk_full_at(4096),
        ),
        "free some space",
    )
    _, subjects = device_state(device)  # the key rotation's half-done step is reconciled
    others = [s for s in before[1] if s != victim]
    assert set(others) <= set(subjects)  # the victim is gone or whole; nobody else is touched
    # With space again, both go through (the ingest first: its file holds the victim too).
    assert lethe("client", "ingest", str(more), "--data-dir", str(device.root)).returncode == 0
    assert lethe("client", "delete-subject", victim, "--data-dir", str(device.root)).returncode == 0
    count, subjects = device_state(device)
    assert victim not in subjects and set(others) <= set(subjects) and count > before[0]


def test_a_read_only_data_directory_is_a_clear_error_and_stays_as_it_was(
    device: DataDir, tmp_path: Path
) -> None:
    before = device_state(device)
    files = sorted(p for p in device.root.rglob("*"))
    contents = {p: p.read_bytes() for p in files if p.is_file()}
    modes = {p: p.stat().st_mode for p in [device.root, *files]}
    for path in [device.root, *files]:
        path.chmod(stat.S_IMODE(modes[path]) & ~0o222)
    try:
        more = records_file(tmp_path, "more", 40, 80)
        clear_error(
            lethe(
                "client",
                "ingest",
                str(more),
                "--data-dir",
                str(device.root),
                fault=obeying_mode_bits,
            ),
            "writable",
        )
        clear_error(
            lethe(
                "client",
                "delete-subject",
                before[1][0],
                "--data-dir",
                str(device.root),
                fault=obeying_mode_bits,
            ),
            "writable",
        )
    finally:
        for path in [device.root, *files]:
            path.chmod(stat.S_IMODE(modes[path]))
    assert {p: p.read_bytes() for p in files if p.is_file()} == contents
    assert device_state(device) == before


def test_the_api_answers_unavailable_when_its_disk_fills_and_keeps_what_it_acknowledged(
    tmp_path: Path,
) -> None:
    files = ApiFiles(tmp_path)
    token = add_token(files.tokens, "notes", Scope.APP, ["notes:*"])
    certs = CertFiles(DataDir(tmp_path).certs)
    init_folder(certs, [], [], datetime.now(UTC))
    DeletionStore(files.url()).close()  # the schema, before the disk is "full"
    address = f"127.0.0.1:{free_port()}"
    limit = files.database.stat().st_size + 64 * 1024  # room for a few requests only
    log = (tmp_path / "api.log").open("wb")
    server = subprocess.Popen(
        [str(LETHE), "api", "serve", "--data-dir", str(tmp_path), "--address", address],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=disk_full_at(limit),
        restore_signals=False,
    )
    acknowledged: list[str] = []
    try:
        with DeletionClient(address, token, root_certificates=certs.ca_cert.read_bytes()) as client:
            wait_until(lambda: client.list(0, 1, "") is not None, "the API", 60, 0.2)
            refusal = None
            for n in range(2000):
                try:
                    acknowledged.append(client.submit(f"notes:{n}", f"key-{n}").request_id)
                except grpc.RpcError as error:
                    refusal = error
                    break
            assert refusal is not None, "the disk never filled"
            assert refusal.code() == grpc.StatusCode.UNAVAILABLE, refusal
            assert "free some space" in (refusal.details() or "")
            assert acknowledged and server.poll() is None  # still serving
            assert len(client.list(0, 500, "").requests) >= 1  # reads still work
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    store = DeletionStore(files.url())
    try:
        kept = {r.request_id for r in store.list(None, None, 500).records}
        assert set(acknowledged) <= kept  # nothing acknowledged was lost
        assert store.submit("notes", "notes:after", [], "after")[1]  # with space, it works again
    finally:
        store.close()
