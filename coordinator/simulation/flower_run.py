"""`lethe simulate`: a simulated fleet through Flower's simulation runtime (Ray).

The ServerApp runs in `virtual` mode (`coordinator.server_app`): the virtual
clock decides when each reply counts, and Flower's SuperNodes run the
ClientApp that trains the simulated task. For a seed the result equals
`coordinator.simulation.fleet.run_in_process` (a test checks it), so the
benchmark can run in process while this proves the Flower path.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.run_config import RunConfig, parse_assignments
from coordinator.simulation.clock import SPEED_DISTRIBUTIONS
from coordinator.simulation.fleet import parse_partition


@dataclass(frozen=True)
class SimulationRequest:
    clients: int
    overrides: dict[str, Any]

    @classmethod
    def create(
        cls,
        policy: str,
        clients: int,
        speeds: str,
        partition: str,
        seed: int,
        budget: float,
        extra: list[str],
    ) -> SimulationRequest:
        if clients < 1:
            raise ValueError(f"need at least one client, got {clients}")
        if speeds not in SPEED_DISTRIBUTIONS:
            raise ValueError(f"speeds must be one of {SPEED_DISTRIBUTIONS}, got {speeds!r}")
        if not budget > 0:
            raise ValueError(f"budget must be positive, got {budget}")
        overrides = {
            **parse_assignments(extra),
            "policy": policy,
            "mode": "virtual",
            "clients": clients,
            "speeds": speeds,
            "dirichlet-alpha": parse_partition(partition),
            "fleet-seed": seed,
            "budget": float(budget),
        }
        policy_keys = {k: v for k, v in overrides.items() if k.replace("-", "_") in _POLICY_KEYS}
        RunConfig.from_mapping(policy_keys)  # refuse a bad policy setting before Ray starts
        return cls(clients, overrides)


_POLICY_KEYS = set(RunConfig.__dataclass_fields__)


def simulate_with_flower(request: SimulationRequest) -> dict[str, Any]:
    """Run the simulation; returns the ServerApp's summary of the virtual run."""
    from flwr.simulation import run_simulation

    from client.client_app import app as client_app
    from coordinator.server_app import make_server_app

    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "result.json"
        server_app = make_server_app({**request.overrides, "result-file": str(out)})
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=request.clients,
            backend_config={"client_resources": {"num_cpus": 1}},
        )
        if not out.exists():
            raise RuntimeError("the simulation ended without a result; see the log above")
        return json.loads(out.read_text())
