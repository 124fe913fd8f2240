"""`lethe coordinator`: start (or reach) a SuperLink, submit Lethe's Flower app, follow its log.

With `listen` set, the coordinator starts Flower's SuperLink itself, with TLS
and SuperNode authentication from `DATA_DIR/certs` unless `insecure`, and
stops it when the run ends. Either way it runs `flwr run APP lethe
--run-config ...` against the SuperLink, then `flwr log --stream`, which
returns when the run ends. The app directory is the one holding Lethe's
pyproject.toml.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.run_config import parse_assignments, toml_assignments
from coordinator.server_app import ServerSettings
from shared.flower_cli import (
    CONNECTION,
    FlowerConnection,
    flower_environment,
    flwr_json,
    parse_address,
    superlink_command,
)
from shared.pki import CertFiles

APP_DIR = Path(__file__).resolve().parents[1]
SUPERLINK_START_S = 60.0


@dataclass(frozen=True)
class CoordinatorLaunch:
    """What `lethe coordinator` was asked to do, checked before anything starts."""

    connection: FlowerConnection
    listen: str | None  # start a SuperLink on this HOST:PORT; None: one already runs
    certs: CertFiles | None  # None: plain HTTP, no node authentication (--insecure)
    run_config: dict[str, Any]
    data_root: Path

    @classmethod
    def create(
        cls,
        superlink: str | None,
        listen: str | None,
        certs: CertFiles | None,
        root_certificates: Path | None,
        settings: dict[str, Any],
        extra: list[str],
        data_root: Path,
    ) -> CoordinatorLaunch:
        if (superlink is None) == (listen is None):
            raise ValueError("give --listen (start a SuperLink) or --superlink (reach one)")
        if listen is not None:
            host, port = parse_address(listen)
            superlink = f"{'127.0.0.1' if host in {'0.0.0.0', '::'} else host}:{port}"
        assert superlink is not None
        if certs is not None:
            root_certificates = root_certificates or certs.ca_cert
            certs.require(root_certificates)
            if listen is not None:
                certs.require(certs.server_cert, certs.server_key)
        run_config = {**settings, **parse_assignments(extra)}
        ServerSettings.from_mapping(run_config)  # refuse bad settings here, not in the SuperLink
        connection = FlowerConnection(superlink, root_certificates if certs else None)
        return cls(connection, listen, certs, run_config, data_root)

    @property
    def flower_home(self) -> Path:
        return self.data_root / "coordinator" / "flwr-home"


def launch(request: CoordinatorLaunch) -> int:
    """Run the coordinator to the end of its run; 0 only if the run finished well."""
    superlink = _start_superlink(request) if request.listen is not None else None
    try:
        return _submit_and_follow(request)
    finally:
        if superlink is not None:
            superlink.terminate()
            try:
                superlink.wait(timeout=30)
            except subprocess.TimeoutExpired:
                superlink.kill()


def _start_superlink(request: CoordinatorLaunch) -> subprocess.Popen[bytes]:
    assert request.listen is not None
    folder = request.data_root / "coordinator"
    folder.mkdir(parents=True, exist_ok=True)
    command = superlink_command(request.listen, folder / "superlink.db", request.certs)
    log = (folder / "superlink.log").open("ab")
    superlink = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=flower_environment()
    )
    host, port = parse_address(request.connection.superlink)
    deadline = time.monotonic() + SUPERLINK_START_S
    while superlink.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        superlink.kill()
        raise RuntimeError(f"the SuperLink did not start; see {folder / 'superlink.log'}")
    mode = "TLS, SuperNode authentication" if request.certs else "plain HTTP (--insecure)"
    print(f"SuperLink listening on {request.listen} ({mode})", file=sys.stderr)
    return superlink


def _submit_and_follow(request: CoordinatorLaunch) -> int:
    connection, home = request.connection, request.flower_home
    submitted = connection.flwr(
        home,
        "run",
        str(APP_DIR),
        CONNECTION,
        "--format",
        "json",
        "--run-config",
        toml_assignments(request.run_config),
    )
    run_id = flwr_json(submitted).get("run-id")
    if submitted.returncode != 0 or run_id is None:
        print(submitted.stdout + submitted.stderr, file=sys.stderr)
        return 1
    print(f"submitted run {run_id} to {connection.superlink}", file=sys.stderr)
    connection.flwr(home, "log", str(run_id), CONNECTION, "--stream", capture=False, timeout=None)
    listed = connection.flwr(home, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
    runs = flwr_json(listed).get("runs") or [{}]
    status, details = runs[0].get("status", "unknown"), runs[0].get("status-details", "")
    print(f"run {run_id}: {status} {details}".rstrip(), file=sys.stderr)
    return 0 if status == "finished:completed" else 1
