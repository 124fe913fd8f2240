"""Flower's processes and CLI as Lethe runs them: TLS and SuperNode authentication by default.

`lethe coordinator --listen` starts a SuperLink and `lethe client run
--superlink` a SuperNode with the command lines built here; `lethe coordinator`,
`lethe node ...` and the local fleet talk to a SuperLink through Flower's own
CLI (`flwr`), configured by a Flower home folder with one connection named
`lethe`. With TLS the SuperLink shows the server
certificate of `DATA_DIR/certs`; with SuperNode authentication it admits only
devices whose public key was registered (`lethe node register`), and a node
unregistered later (`lethe node revoke`) is refused from its next call on.

Flower 1.41 serves the Fleet, Control and Runtime APIs on one HTTPS port.
The Control API (register nodes, submit runs) answers anyone who reaches that
port, so bind it to an interface only devices and operators can reach.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.pki import CertFiles

BIN = Path(sys.executable).parent  # this environment's console scripts
CONNECTION = "lethe"


def flower_environment() -> dict[str, str]:
    """This process's environment with this installation's scripts first on PATH: Flower's
    processes start their helpers (`flower-superexec`, `flwr-serverapp`) by name."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT split, or ValueError naming what was wrong."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def superlink_command(
    listen: str, database: Path, certs: CertFiles | None, *, node_auth: bool = True
) -> list[str]:
    """The `flower-superlink` command line; `certs=None` means plain HTTP (tests, --insecure)."""
    host, port = parse_address(listen)
    command = [
        str(BIN / "flower-superlink"),
        "--disable-runtime-dependency-installation",  # the environment is already complete
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(database),
    ]
    if certs is None:
        return [*command, "--insecure"]
    certs.require(certs.ca_cert, certs.server_cert, certs.server_key)
    command += [
        "--ssl-ca-certfile",
        str(certs.ca_cert),
        "--ssl-certfile",
        str(certs.server_cert),
        "--ssl-keyfile",
        str(certs.server_key),
    ]
    return [*command, "--enable-supernode-auth"] if node_auth else command


@dataclass(frozen=True)
class FlowerConnection:
    """How `flwr` reaches a SuperLink: its address, and the CA to trust (None: plain)."""

    superlink: str
    root_certificates: Path | None

    def __post_init__(self) -> None:
        parse_address(self.superlink)

    def home(self, folder: Path) -> Path:
        """Write a Flower home in `folder` whose default connection is this one."""
        folder.mkdir(parents=True, exist_ok=True)
        lines = [
            "[superlink]",
            f'default = "{CONNECTION}"',
            "",
            f"[superlink.{CONNECTION}]",
            f'address = "{self.superlink}"',
            f"insecure = {'true' if self.root_certificates is None else 'false'}",
        ]
        if self.root_certificates is not None:
            lines.append(f'root-certificates = "{self.root_certificates.resolve()}"')
        (folder / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return folder

    def flwr(
        self, folder: Path, *arguments: str, capture: bool = True, timeout: float | None = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run `flwr ARGUMENTS` against this SuperLink (the connection is named `lethe`)."""
        env = {**flower_environment(), "FLWR_HOME": str(self.home(folder))}
        return subprocess.run(
            [str(BIN / "flwr"), *arguments],
            env=env,
            capture_output=capture,
            text=True,
            timeout=timeout,
            check=False,
        )


def flwr_json(completed: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON object `flwr ... --format json` printed, or {} when it printed none."""
    try:
        value = json.loads(completed.stdout or "")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def register_node(
    connection: FlowerConnection, folder: Path, public_key: Path, name: str | None = None
) -> int:
    """Enrol a device's public key with the SuperLink; its Flower node id."""
    arguments = ["supernode", "register", str(public_key), CONNECTION, "--format", "json"]
    if name is not None:
        arguments += ["--name", name]
    completed = connection.flwr(folder, *arguments)
    node_id = flwr_json(completed).get("node-id")
    if completed.returncode != 0 or not isinstance(node_id, int):
        raise RuntimeError(_flwr_failure("register", completed))
    return node_id


def revoke_node(connection: FlowerConnection, folder: Path, node_id: int) -> None:
    """Unregister a node: the SuperLink refuses it from its next call on."""
    completed = connection.flwr(
        folder, "supernode", "unregister", str(node_id), CONNECTION, "--format", "json"
    )
    if completed.returncode != 0 or flwr_json(completed).get("success") is not True:
        raise RuntimeError(_flwr_failure("unregister", completed))


def list_nodes(connection: FlowerConnection, folder: Path) -> list[dict[str, Any]]:
    """The SuperLink's nodes as `flwr supernode list` reports them."""
    completed = connection.flwr(folder, "supernode", "list", CONNECTION, "--format", "json")
    nodes = flwr_json(completed).get("nodes")
    if completed.returncode != 0 or not isinstance(nodes, list):
        raise RuntimeError(_flwr_failure("list", completed))
    return nodes


def _flwr_failure(what: str, completed: subprocess.CompletedProcess[str]) -> str:
    reported = flwr_json(completed).get("error-message")
    text = reported or (completed.stderr or completed.stdout or "").strip()[-500:]
    return f"flwr supernode {what} failed: {text or f'exit code {completed.returncode}'}"


def supernode_command(
    superlink: str,
    port: int,
    node_config: str,
    root_certificates: Path | None,
    node_key: Path | None,
) -> list[str]:
    """The `flower-supernode` command line for a device. `root_certificates=None` is plain
    HTTP; `node_key` (OpenSSH private key) authenticates the node to the SuperLink."""
    parse_address(superlink)
    command = [
        str(BIN / "flower-supernode"),
        "--superlink",
        superlink,
        "--port",
        str(port),
        "--node-config",
        node_config,
    ]
    if root_certificates is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(root_certificates)]
    if node_key is not None:
        command += ["--auth-supernode-private-key", str(node_key)]
    return command
