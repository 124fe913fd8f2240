"""Flower as Lethe runs it by default, with real processes on loopback: a SuperLink with TLS
and SuperNode authentication, devices enrolled and revoked with `lethe node`, SuperNodes
kept alive by the device's keeper. Only enrolled keys get in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from client.supernode import SuperNodeKeeper
from lethe.fleet.processes import ProcessGroup, wait_until
from shared.flower_cli import free_port, parse_address, superlink_command, supernode_command
from shared.paths import DataDir
from shared.pki import CertFiles

pytestmark = pytest.mark.slow

LETHE = Path(sys.executable).parent / "lethe"


def lethe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LETHE), *args], capture_output=True, text=True, timeout=120, check=False
    )


def node(
    command: str, *args: str, superlink: str, data_dir: Path
) -> subprocess.CompletedProcess[str]:
    """`lethe node COMMAND ARGS` against the SuperLink, with the coordinator's certificates."""
    return lethe("node", command, *args, "--superlink", superlink, "--data-dir", str(data_dir))


def statuses(superlink: str, data_dir: Path) -> dict[str, str]:
    """Flower node id -> status, as `lethe node list` shows them."""
    listed = node("list", superlink=superlink, data_dir=data_dir)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("│") for line in listed.stdout.splitlines() if line.count("│") >= 4]
    return {cells[1].strip(): cells[3].strip() for cells in rows if cells[1].strip().isdigit()}


def test_only_enrolled_devices_join_over_tls_and_a_revoked_one_is_shut_out(
    tmp_path: Path,
) -> None:
    root = tmp_path / "coordinator"
    made = lethe("certs", "init", "--node", "alpha", "--node", "beta", "--data-dir", str(root))
    assert made.returncode == 0, made.stderr
    certs = CertFiles(DataDir(root).certs)
    assert (
        certs.ca_key.stat().st_mode & 0o077 == 0
        and certs.node_key("beta").stat().st_mode & 0o077 == 0
    )
    superlink = f"127.0.0.1:{free_port()}"
    with ProcessGroup(tmp_path / "logs") as processes:
        processes.start("superlink", *superlink_command(superlink, tmp_path / "sl.db", certs))
        host, port = parse_address(superlink)
        wait_until(
            lambda: (
                lethe("node", "list", "--superlink", superlink, "--data-dir", str(root)).returncode
                == 0
            ),
            "SuperLink",
            60,
        )  # noqa: E501

        registered = lethe(
            "node", "register", "alpha", "--superlink", superlink, "--data-dir", str(root)
        )  # noqa: E501
        assert registered.returncode == 0, registered.stderr
        alpha_id = registered.stdout.strip()

        def device(name: str, port_: int) -> list[str]:
            config = f"data-dir='{tmp_path / name}'"
            return supernode_command(superlink, port_, config, certs.ca_cert, certs.node_key(name))

        alpha = processes.start("alpha", *device("alpha", free_port()))
        intruder = processes.start("beta-unenrolled", *device("beta", free_port()))
        plain = processes.start("plain", *supernode_command(superlink, free_port(), "", None, None))
        wait_until(lambda: statuses(superlink, root).get(alpha_id) == "online", "alpha online", 60)
        assert intruder.wait(timeout=60) is not None  # refused at start: it gives up
        assert plain.poll() is None and len(statuses(superlink, root)) == 1  # never got in

        # Beta's own keeper restarts its SuperNode until the operator enrols it.
        keeper = SuperNodeKeeper(
            lambda port_: device("beta", port_), (host, port), tmp_path / "beta-keeper.log"
        ).start()
        try:
            wait_until(lambda: keeper.starts >= 2, "beta's keeper to retry", 60)
            enrolled = lethe(
                "node", "register", "beta", "--superlink", superlink, "--data-dir", str(root)
            )  # noqa: E501
            assert enrolled.returncode == 0, enrolled.stderr
            beta_id = enrolled.stdout.strip()
            wait_until(lambda: statuses(superlink, root).get(beta_id) == "online", "beta", 90)
        finally:
            keeper.stop()

        revoked = lethe(
            "node", "revoke", alpha_id, "--superlink", superlink, "--data-dir", str(root)
        )  # noqa: E501
        assert revoked.returncode == 0, revoked.stderr
        assert statuses(superlink, root).get(alpha_id) != "online"
        wait_until(lambda: alpha.poll() is not None, "the revoked SuperNode to be shut out", 90)
