"""`lethe coordinator`: submit Lethe's Flower app to a SuperLink and follow its log.

The ServerApp runs where the SuperLink starts it; this writes a Flower
connection for the SuperLink into `DATA_DIR/coordinator/flwr-home` and runs
`flwr run APP lethe --run-config ... --stream`, which returns when the run
ends. The app directory is the one holding Lethe's pyproject.toml.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.run_config import parse_assignments, toml_assignments
from coordinator.server_app import ServerSettings

APP_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "lethe"


@dataclass(frozen=True)
class CoordinatorLaunch:
    superlink: str
    insecure: bool
    root_certificates: Path | None
    run_config: dict[str, Any]
    data_root: Path

    @classmethod
    def create(
        cls,
        superlink: str,
        insecure: bool,
        root_certificates: Path | None,
        settings: dict[str, Any],
        extra: list[str],
        data_root: Path,
    ) -> CoordinatorLaunch:
        host, _, port = superlink.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"superlink must be HOST:PORT, got {superlink!r}")
        if not insecure and root_certificates is None:
            raise ValueError("give --root-certificates for TLS, or --insecure for plain gRPC")
        run_config = {**settings, **parse_assignments(extra)}
        ServerSettings.from_mapping(run_config)  # refuse bad settings here, not in the SuperLink
        return cls(superlink, insecure, root_certificates, run_config, data_root)


def flower_home(request: CoordinatorLaunch) -> Path:
    """A Flower config dir whose `lethe` connection points at the SuperLink."""
    home = request.data_root / "coordinator" / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "{request.superlink}"',
        f"insecure = {'true' if request.insecure else 'false'}",
    ]
    if request.root_certificates is not None:
        lines.append(f'root-certificates = "{request.root_certificates.resolve()}"')
    (home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return home


def launch(request: CoordinatorLaunch) -> int:
    """Submit the run, stream its log until it ends; 0 only if the run finished well."""
    env = {**os.environ, "FLWR_HOME": str(flower_home(request))}
    # The SuperLink starts helpers by name: this environment's bin must be on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    flwr = str(Path(sys.executable).with_name("flwr"))
    submit = [flwr, "run", str(APP_DIR), CONNECTION, "--format", "json"]
    submit += ["--run-config", toml_assignments(request.run_config)]
    submitted = subprocess.run(submit, env=env, capture_output=True, text=True, check=False)
    run_id = _json(submitted.stdout).get("run-id")
    if submitted.returncode != 0 or run_id is None:
        print(submitted.stdout + submitted.stderr, file=sys.stderr)
        return 1
    print(f"submitted run {run_id} to {request.superlink}", file=sys.stderr)
    subprocess.run([flwr, "log", str(run_id), CONNECTION, "--stream"], env=env, check=False)
    listed = subprocess.run(
        [flwr, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    runs = _json(listed.stdout).get("runs") or [{}]
    status, details = runs[0].get("status", "unknown"), runs[0].get("status-details", "")
    print(f"run {run_id}: {status} {details}".rstrip(), file=sys.stderr)
    return 0 if status == "finished:completed" else 1


def _json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
