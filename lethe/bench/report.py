"""What every benchmark JSON records about the machine it ran on, and how it is written.

Figures from a shared, noisy machine mean little without the load around
them, so each report carries the load average before and after the run.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from shared.devices import resolve_torch_device


def machine_facts(device: str, load_before: Sequence[float]) -> dict[str, Any]:
    """Device, torch version, CPU and the load average before and now."""
    return {
        "device": str(resolve_torch_device(device)),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def write_report(json_path: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Write the report as indented JSON and return it."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    return report
