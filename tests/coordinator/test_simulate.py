"""`lethe simulate`: a fleet through Flower's simulation runtime gives what the in-process
virtual clock gives for the same seed; bad flags are refused before Ray starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.run_config import RunConfig
from coordinator.simulation.fleet import FleetSpec, run_in_process

LETHE = [sys.executable, "-m", "lethe"]


def lethe(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [*LETHE, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


@pytest.mark.slow
def test_flower_simulation_equals_the_in_process_run(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    done = lethe(
        "simulate",
        "--policy",
        "fedcompass",
        "--clients",
        "6",
        "--speeds",
        "exponential",
        "--partition",
        "dirichlet:0.5",
        "--seed",
        "3",
        "--budget",
        "1500",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    flower = json.loads(out.read_text())
    local = run_in_process(RunConfig(), FleetSpec(6, "exponential", 0.5, 3, 1500.0))
    assert flower["updates"] == local.updates > 0
    assert flower["accuracies"] == local.curve.accuracies
    assert flower["times"] == local.curve.times
    assert "fedcompass:" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--partition", "class:2"), "partition must be"),
        (("--speeds", "uniform"), "speeds must be one of"),
        (("--policy", "fedprox"), "unknown policy"),
        (("--run-config", "q-min=500"), "q_min <= q_max"),
    ],
)
def test_bad_simulation_flags_are_refused(args: tuple[str, ...], message: str) -> None:
    done = lethe("simulate", *args, timeout=120)
    assert done.returncode == 1 and message in done.stderr


def test_coordinator_refuses_bad_settings(tmp_path: Path) -> None:
    done = lethe("coordinator", "--superlink", "nowhere", "--insecure", timeout=120)
    assert done.returncode == 1 and "HOST:PORT" in done.stderr
    done = lethe("coordinator", "--run-config", "polcy='fedavg'", "--insecure", timeout=120)
    assert done.returncode == 1 and "unknown run config key" in done.stderr
    done = lethe("coordinator", "--data-dir", str(tmp_path), timeout=120)  # no certificates
    assert done.returncode == 1 and "lethe certs init" in done.stderr
