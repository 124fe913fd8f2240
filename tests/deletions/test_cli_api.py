"""`lethe api ...` and `lethe receipt verify` as an operator runs them: real processes,
a real server killed with SIGKILL, a receipt checked from its file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.deletions.client import DeletionClient
from coordinator.deletions.layout import ApiFiles
from coordinator.deletions.status import Status
from coordinator.deletions.store import DeletionStore
from shared.paths import DataDir
from shared.pki import CertFiles
from shared.receipts import ensure_signing_key, generate_signing_key, public_key_path, sign_receipt

LETHE = Path(sys.executable).parent / "lethe"  # the venv's console script


def lethe(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("LETHE_API_TOKEN", None)
    if token is not None:
        env["LETHE_API_TOKEN"] = token
    return subprocess.run(
        [str(LETHE), *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def add_token(data_dir: Path, app: str, *options: str) -> str:
    made = lethe("api", "token", "add", "--app", app, *options, "--data-dir", str(data_dir))
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def start_api(data_dir: Path, address: str, log: Path) -> subprocess.Popen[bytes]:
    """`lethe api serve` (TLS with the data directory's certificates), returned once its
    health check says SERVING."""
    if not CertFiles(DataDir(data_dir).certs).ca_cert.exists():
        made = lethe("certs", "init", "--data-dir", str(data_dir))
        assert made.returncode == 0, made.stderr
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [str(LETHE), "api", "serve", "--data-dir", str(data_dir), "--address", address],
            stdout=sink,
            stderr=sink,
        )
    deadline = time.monotonic() + 30
    trusted = grpc.ssl_channel_credentials(ca_of(data_dir))
    with grpc.secure_channel(address, trusted) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert process.poll() is None, log.read_text()
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return process
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "lethe api serve did not come up"
            time.sleep(0.1)


def ca_of(data_dir: Path) -> bytes:
    return CertFiles(DataDir(data_dir).certs).ca_cert.read_bytes()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Servers a test started; any still running at the end are killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_an_acknowledged_request_survives_kill_9(
    tmp_path: Path, unused_address: str, servers: list[subprocess.Popen[bytes]]
) -> None:
    token = add_token(tmp_path, "notes", "--subjects", "notes:*")
    log = tmp_path / "api.log"
    servers.append(start_api(tmp_path, unused_address, log))
    with DeletionClient(unused_address, token, root_certificates=ca_of(tmp_path)) as client:
        request = client.submit("notes:alice", "durable")
    os.kill(servers[0].pid, signal.SIGKILL)  # right after the reply: no chance to flush
    assert servers[0].wait(timeout=10) == -signal.SIGKILL

    servers.append(start_api(tmp_path, unused_address, log))
    at = ("--address", unused_address, "--data-dir", str(tmp_path))
    shown = lethe("api", "get", request.request_id, *at, token=token)
    assert shown.returncode == 0, shown.stderr
    stored = json.loads(shown.stdout)
    assert stored["request_id"] == request.request_id and stored["status"] == "RECEIVED"
    assert stored["subject_id"] == "notes:alice" and stored["idempotency_key"] == "durable"

    servers[1].send_signal(signal.SIGTERM)
    assert servers[1].wait(timeout=15) == 0
    assert "deletion API stopped" in log.read_text()


def test_submit_watch_get_and_verify_the_receipt_from_the_command_line(
    tmp_path: Path, unused_address: str, servers: list[subprocess.Popen[bytes]]
) -> None:
    token = add_token(tmp_path, "notes", "--subjects", "notes:*")
    assert add_token(tmp_path, "ops", "--scope", "operator") != token
    servers.append(start_api(tmp_path, unused_address, tmp_path / "api.log"))
    at = ("--address", unused_address, "--data-dir", str(tmp_path))

    bad = lethe("api", "submit", "mail:bob", "--idempotency-key", "x", *at, token=token)
    assert bad.returncode == 1 and "PERMISSION_DENIED" in bad.stderr
    refused = lethe("api", "get", "whatever", *at, token="wrong")
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    submitted = lethe(
        "api", "submit", "notes:alice", "--idempotency-key", "e2e", "--kind", "text", *at,
        token=token,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    request = json.loads(submitted.stdout)
    assert request["status"] == "RECEIVED" and request["selectors"] == [{"kinds": ["text"]}]
    rid = request["request_id"]
    env = {**os.environ, "LETHE_API_TOKEN": token}
    watcher = subprocess.Popen(
        [str(LETHE), "api", "watch", rid, *at], stdout=subprocess.PIPE, text=True, env=env
    )

    # The coordinator's side, in this process: same database, its own connections.
    files = ApiFiles(tmp_path)
    loop = DeletionStore(files.url())
    for status in (Status.DISPATCHED, Status.APPLIED_ON_DEVICES, Status.APPLIED_GLOBALLY):
        loop.transition(rid, status)
    record = loop.get(rid)
    key = ensure_signing_key(files.signing_key)
    signed = sign_receipt(
        {
            "request_id": rid,
            "subject_hash": record.subject_hash,
            "model_versions_before": {"shared": 1},
            "model_versions_after": {"shared": 2},
            "measurements": {"canary_exposure": 0.03},
            "timestamps": {"received": record.created_at, "verified": 5.0, "issued": 6.0},
        },
        key,
    )
    loop.attach_receipt(rid, signed.body, signed.signature, signed.key_id)
    loop.transition(rid, Status.VERIFIED)
    loop.close()
    out, _ = watcher.communicate(timeout=30)
    assert watcher.returncode == 0
    statuses = [json.loads(line)["status"] for line in out.splitlines()]
    assert statuses == [
        "RECEIVED",
        "DISPATCHED",
        "APPLIED_ON_DEVICES",
        "APPLIED_GLOBALLY",
        "VERIFIED",
    ]

    receipt_file = tmp_path / "receipt.json"
    got = lethe("api", "get", rid, "--receipt-out", str(receipt_file), *at, token=token)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["receipt"]["body"]["request_id"] == rid
    public = public_key_path(files.signing_key)
    verified = lethe("receipt", "verify", str(receipt_file), "--public-key", str(public))
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["subject_hash"] == record.subject_hash

    document = json.loads(receipt_file.read_text())
    document["receipt"]["measurements"]["canary_exposure"] = 0.0
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(document))
    failed = lethe("receipt", "verify", str(tampered), "--public-key", str(public))
    assert failed.returncode == 1 and "bad signature" in failed.stderr
    other = tmp_path / "other.key"
    generate_signing_key(other)
    wrong = lethe(
        "receipt", "verify", str(receipt_file), "--public-key", str(public_key_path(other))
    )
    assert wrong.returncode == 1 and "signed by key" in wrong.stderr
    (tmp_path / "junk.json").write_text("not json")
    junk = lethe("receipt", "verify", str(tmp_path / "junk.json"), "--public-key", str(public))
    assert junk.returncode == 1 and "not JSON" in junk.stderr


def test_secure_by_default_and_tokens_listed_and_revoked(
    tmp_path: Path, unused_address: str, servers: list[subprocess.Popen[bytes]]
) -> None:
    notes = add_token(tmp_path, "notes", "--subjects", "notes:*")
    mail = add_token(tmp_path, "mail", "--subjects", "mail:*")
    refused = lethe("api", "serve", "--data-dir", str(tmp_path), "--address", unused_address)
    assert refused.returncode == 1 and "lethe certs init" in refused.stderr  # no plain fallback
    servers.append(start_api(tmp_path, unused_address, tmp_path / "api.log"))
    at = ("--address", unused_address, "--data-dir", str(tmp_path))
    plain = lethe("api", "list", "--address", unused_address, "--insecure", token=notes)
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr  # a TLS server only

    listed = lethe("api", "token", "list", "--data-dir", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    assert "notes" in listed.stdout and "mail" in listed.stdout
    assert notes not in listed.stdout and mail not in listed.stdout  # ids, never the tokens
    tokens_text = (ApiFiles(tmp_path).tokens).read_text()
    assert notes not in tokens_text and mail not in tokens_text
    entries = json.loads(tokens_text)["tokens"]
    notes_id = next(e["sha256"][:12] for e in entries if e["app"] == "notes")
    assert notes_id in listed.stdout

    assert (
        lethe("api", "submit", "notes:a", "--idempotency-key", "1", *at, token=notes).returncode
        == 0
    )
    revoked = lethe("api", "token", "revoke", notes_id, "--data-dir", str(tmp_path))
    assert revoked.returncode == 0, revoked.stderr
    after = lethe("api", "submit", "notes:b", "--idempotency-key", "2", *at, token=notes)
    assert after.returncode == 1 and "UNAUTHENTICATED" in after.stderr  # the running server
    assert lethe("api", "list", *at, token=mail).returncode == 0  # the other token still works
    again = lethe("api", "token", "revoke", notes_id, "--data-dir", str(tmp_path))
    assert again.returncode == 1 and "no token" in again.stderr
    bad = lethe("api", "token", "revoke", "../../etc", "--data-dir", str(tmp_path))
    assert bad.returncode == 1 and "12 hex digits" in bad.stderr
    store = DeletionStore(ApiFiles(tmp_path).url())
    try:
        assert [r.subject_id for r in store.list(None, None, 10).records] == ["notes:a"]
    finally:
        store.close()
    log = (tmp_path / "api.log").read_text()
    assert "listening" in log and notes not in log and mail not in log  # no secret in the log
