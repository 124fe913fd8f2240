"""A real federation on loopback, secured as Lethe runs by default, under faults.

`lethe coordinator` starts the SuperLink (TLS, SuperNode authentication) and FedCompass; a
device (`lethe client run --superlink`, a tiny model) is enrolled with `lethe node register`
and trains. It is killed with SIGKILL in the middle of its local training: its group still
closes at its deadline, and the device, restarted, is the same node (same key), joins
again and gets work. A key nobody enrolled is refused; a revoked device is shut out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.console.source import StoreLocation, StoreSource
from coordinator.console.view import FleetView
from edge_models.corpus import build_corpus, device_stream, partition
from lethe.fleet.processes import ProcessGroup, wait_until
from shared.flower_cli import free_port, supernode_command
from shared.paths import DataDir
from shared.pki import CertFiles

pytestmark = pytest.mark.slow

LETHE = Path(sys.executable).parent / "lethe"
RUN = "faults"


def lethe(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [str(LETHE), *args], capture_output=True, text=True, timeout=120, check=False, env=env
    )


def node_statuses(superlink: str, root: Path) -> dict[str, str]:
    """Flower node id -> status, as `lethe node list` shows them."""
    listed = lethe("node", "list", "--superlink", superlink, "--data-dir", str(root))
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("│") for line in listed.stdout.splitlines() if line.count("│") >= 4]
    return {cells[1].strip(): cells[3].strip() for cells in rows if cells[1].strip().isdigit()}


def test_a_killed_device_rejoins_as_itself_and_only_enrolled_keys_get_in(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    coordinator, device = tmp_path / "coordinator", DataDir(tmp_path / "device")
    made = lethe(
        "certs", "init", "--node", "phone", "--node", "stranger", "--data-dir", str(coordinator)
    )
    assert made.returncode == 0, made.stderr
    certs = CertFiles(DataDir(coordinator).certs)
    for secret in (certs.ca_key, certs.server_key, certs.node_key("phone")):
        assert secret.stat().st_mode & 0o077 == 0, secret  # private keys: the owner only
    corpus = build_corpus(0)
    records = device_stream(corpus, partition(corpus, 3, seed=0)[0], seed=0)[:24]
    inbox = device.device / "inbox"
    inbox.mkdir(parents=True)
    (inbox / "first.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    superlink = f"127.0.0.1:{free_port()}"
    daemon_command = [
        str(LETHE), "client", "run", "--model", str(tiny_model_dir), "--device", "cpu",
        "--threads", "1", "--poll", "0.2", "--max-steps-per-burst", "3",
        "--superlink", superlink, "--node-key", str(certs.node_key("phone")),
        "--root-certificates", str(certs.ca_cert), "--data-dir", str(device.root),
    ]  # fmt: skip
    source = StoreSource(StoreLocation.in_data_dir(coordinator, RUN))
    with ProcessGroup(tmp_path / "logs") as processes:
        processes.start(
            "coordinator", str(LETHE), "coordinator", "--listen", superlink, "--data-dir",
            str(coordinator), "--run-name", RUN, "--time-limit", "600",
            "--run-config", f"model='{tiny_model_dir}'", "--run-config", "device='cpu'",
            "--run-config", "q-min=2", "--run-config", "q-max=4",
            "--run-config", "lost-slack-s=5.0",
        )  # fmt: skip
        at = ("--superlink", superlink, "--data-dir", str(coordinator))
        wait_until(lambda: lethe("node", "list", *at).returncode == 0, "the SuperLink", 90)
        registered = lethe("node", "register", "phone", *at)
        assert registered.returncode == 0, registered.stderr
        node_id = int(registered.stdout.strip())
        daemon = processes.start("daemon", *daemon_command)

        def training() -> FleetView | None:
            view = source.read()
            mine = [n for n in view.nodes if n.node == node_id]
            return view if view.version >= 1 and mine and mine[0].steps is not None else None

        view = wait_until(training, "the device to train", 180)
        updates_before = next(n.updates for n in view.nodes if n.node == node_id)
        group = next(n.group for n in view.nodes if n.node == node_id)
        os.kill(daemon.pid, signal.SIGKILL)  # mid-training: its SuperNode goes with it
        killed_at = time.time()

        def closed(view: FleetView) -> bool:
            return any(g.group == group and g.closed_at is not None for g in view.groups)

        wait_until(lambda: closed(source.read()), "its group to close at its deadline", 120)
        restarted = processes.start("daemon-again", *daemon_command)
        back = wait_until(
            lambda: next(
                (
                    n
                    for n in source.read().nodes
                    if n.node == node_id and n.updates > updates_before
                ),
                None,
            ),
            "the restarted device to train and be heard again",
            240,
        )
        assert back.last_seen > killed_at and restarted.poll() is None
        assert {n.node for n in source.read().nodes} == {node_id}  # the same node, not a new one

        stranger = processes.start(
            "stranger",
            *supernode_command(
                superlink, free_port(), "", certs.ca_cert, certs.node_key("stranger")
            ),
        )
        assert stranger.wait(timeout=90) is not None  # refused at start: it gives up
        assert set(node_statuses(superlink, coordinator)) == {str(node_id)}

        revoked = lethe("node", "revoke", str(node_id), *at)
        assert revoked.returncode == 0, revoked.stderr
        wait_until(
            lambda: node_statuses(superlink, coordinator).get(str(node_id)) != "online",
            "the revoked device to be shut out",
            90,
        )
    source.close()
    secret = certs.node_key("phone").read_text().splitlines()[1]  # a line of the private key
    logs = [*(tmp_path / "logs").glob("*.log"), *tmp_path.rglob("superlink.log")]
    logs += [*tmp_path.rglob("supernode.log")]
    assert logs and not any(secret in path.read_text(errors="replace") for path in logs)
