"""The `lethe` command as a user runs it: a real subprocess, a fresh data directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LETHE = [sys.executable, "-m", "lethe"]


def run(*args: str, data_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LETHE_DATA_DIR": str(data_dir), "COLUMNS": "200"}
    return subprocess.run(
        [*LETHE, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def test_help_lists_the_subcommands(tmp_path: Path) -> None:
    result = run("--help", data_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("model", "corpus", "client", "bench", "demo"):
        assert command in result.stdout
    client_help = run("client", "--help", data_dir=tmp_path)
    for command in ("ingest", "generate", "delete-subject"):
        assert command in client_help.stdout


def test_ingest_then_delete_a_subject(tmp_path: Path) -> None:
    stream = tmp_path / "stream.jsonl"
    made = run("corpus", "stream", "--out", str(stream), "--device", "1", data_dir=tmp_path)
    assert made.returncode == 0, made.stderr
    records = [json.loads(line) for line in stream.read_text().splitlines()]
    subject = records[0]["subject_id"]
    held = sum(r["subject_id"] == subject for r in records)

    first = run("client", "ingest", str(stream), data_dir=tmp_path)
    assert first.returncode == 0, first.stderr
    assert f"stored {len(records)} new record(s)" in first.stdout
    again = run("client", "ingest", str(stream), data_dir=tmp_path)
    assert "stored 0 new record(s)" in again.stdout
    assert f"{len(records)} duplicate(s)" in again.stdout

    deleted = run("client", "delete-subject", subject, data_dir=tmp_path)
    assert deleted.returncode == 0, deleted.stderr
    assert f"{held} record(s)" in deleted.stdout
    unknown = run("client", "delete-subject", subject, data_dir=tmp_path)
    assert unknown.returncode == 1
    assert "error" in unknown.stderr.lower()


def test_a_bad_file_is_rejected_with_line_numbers_and_stores_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(
        b'{"subject_id": "s1", "text": "fine"}\n'
        b'{"subject_id": "s1"}\n'
        b'{"subject_id": 7, "text": "wrong type"}\n'
        b'{"subject_id": "s2", "text": "cut off'
    )
    result = run("client", "ingest", str(bad), data_dir=tmp_path)
    assert result.returncode == 1
    assert "nothing was stored" in result.stderr
    for line in (2, 3, 4):
        assert f"bad.jsonl:{line}:" in result.stderr
    assert "bad.jsonl:1:" not in result.stderr
    good = tmp_path / "good.jsonl"
    good.write_text('{"subject_id": "s1", "text": "fine"}\n')
    after = run("client", "ingest", str(good), data_dir=tmp_path)
    assert "the device holds 1 record(s)" in after.stdout


@pytest.mark.slow
def test_generate_answers_with_onnx_runtime(built_default_model, tmp_path: Path) -> None:
    _, version, _ = built_default_model
    from edge_models.corpus import build_corpus

    fact = build_corpus(0).split("base")[0].facts[0]
    result = run(
        "client", "generate", fact.prompts[0], "--model", str(version.path), data_dir=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert fact.prompts[0] in result.stdout
    assert list((tmp_path / "device" / "onnx").glob("*/model.onnx"))
    sampled = run(
        "client",
        "generate",
        "The",
        "--model",
        str(version.path),
        "--temperature",
        "0.8",
        "--seed",
        "3",
        "--max-new-tokens",
        "5",
        data_dir=tmp_path,
    )
    assert sampled.returncode == 0, sampled.stderr
    bad = run(
        "client", "generate", "hi", "--top-p", "0", "--model", str(version.path), data_dir=tmp_path
    )
    assert bad.returncode == 1 and "top_p" in bad.stderr


def start_daemon(data_dir: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "LETHE_DATA_DIR": str(data_dir)}
    return subprocess.Popen(
        # Short fixed bursts: this test is about resuming after a kill, not about how long
        # learning until the records are known takes.
        [*LETHE, "client", "run", "--poll", "0.2", "--device", "cpu"]
        + ["--epochs-per-burst", "20", "--max-steps-per-burst", "150"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(check, process: subprocess.Popen[str], timeout: float = 300):
    """Poll `check` until it returns something true; errors mean "not up yet"."""
    import time

    import grpc

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"daemon exited early: {process.communicate()[1][-3000:]}")
        try:
            value = check()
        except (OSError, grpc.RpcError) as error:
            value, last = None, error
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out; last error: {last}")


@pytest.mark.slow
def test_the_device_daemon_learns_survives_kill_9_and_stops_cleanly(
    built_default_model, tmp_path: Path
) -> None:
    import signal

    from client.device_channel import DeviceClient
    from shared.paths import DataDir

    models_root, _, _ = built_default_model
    shutil.copytree(models_root, tmp_path / "models")
    data = DataDir(tmp_path)
    stream = tmp_path / "stream.jsonl"
    assert run("corpus", "stream", "--out", str(stream), data_dir=tmp_path).returncode == 0
    lines = stream.read_text().splitlines()
    inbox = data.device / "inbox"
    inbox.mkdir(parents=True)

    def drop(name: str, chunk: list[str]) -> None:
        (inbox / f"{name}.jsonl.part").write_text("\n".join(chunk) + "\n")
        (inbox / f"{name}.jsonl.part").rename(inbox / f"{name}.jsonl")

    def status():
        with DeviceClient(data.device, timeout_s=10) as client:
            return client.status()

    drop("first", lines[:40])
    daemon = start_daemon(tmp_path)
    try:
        first = wait_for(lambda: (s := status()).personal_version >= 1 and s, daemon)
        assert first.records == 40 and first.trained_through > 0
        drop("second", lines[40:300])
        wait_for(lambda: status().bursts >= 2, daemon)  # training the second file
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=30)

        daemon = start_daemon(tmp_path)  # resumes from the last saved burst
        resumed = wait_for(status, daemon)
        assert resumed.trained_through >= first.trained_through
        # Row ids run 1..N (nothing deleted): trained and pending add up to what is stored.
        assert resumed.records == resumed.trained_through + resumed.pending > first.records
        done = wait_for(lambda: (s := status()).pending == 0 and s, daemon)
        assert done.trained_through > first.trained_through
        with DeviceClient(data.device, timeout_s=30) as client:
            reply = client.generate(["hello"], max_new_tokens=4)
        assert len(reply.texts) == 1 and done.export
        daemon.send_signal(signal.SIGTERM)
        _out, err = daemon.communicate(timeout=60)
        assert daemon.returncode == 0 and "device daemon stopped" in err
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
