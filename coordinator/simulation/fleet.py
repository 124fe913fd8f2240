"""A simulated fleet: the task, the clients' data and speeds, and a run on the virtual clock.

`run_in_process` is what `lethe bench scheduling` runs for every policy;
`lethe simulate` runs the same fleet through Flower's simulation runtime
(`coordinator.simulation.flower_app`), and for one seed both give the same
result, because training is a pure function of (model, data, steps, seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from coordinator.core import Work
from coordinator.run_config import RunConfig
from coordinator.simulation.clock import (
    ClockConfig,
    InProcessTransport,
    VirtualResult,
    draw_speeds,
    run_virtual,
)
from coordinator.simulation.task import Task
from shared.fl_messages import TrainReply


@dataclass(frozen=True)
class FleetSpec:
    """Who the simulated clients are: how many, how fast, how their data are split."""

    clients: int = 10
    speeds: str = "exponential"
    dirichlet_alpha: float = 0.5  # <= 0: IID
    seed: int = 1
    budget: float = 4000.0  # virtual seconds
    mean_speed: float = 1.0  # virtual seconds per local step

    def clock(self) -> ClockConfig:
        return ClockConfig(budget=self.budget, seed=self.seed)

    def speed_list(self) -> list[float]:
        return draw_speeds(self.speeds, self.clients, self.seed, self.mean_speed)


def parse_partition(text: str) -> float:
    """`dirichlet:ALPHA` or `iid` as the Dirichlet alpha (0 for IID)."""
    if text == "iid":
        return 0.0
    kind, _, value = text.partition(":")
    try:
        alpha = float(value)
    except ValueError:
        alpha = -1.0
    if kind != "dirichlet" or not alpha > 0:
        raise ValueError(
            f"partition must be 'iid' or 'dirichlet:ALPHA' with ALPHA > 0, got {text!r}"
        )
    return alpha


class ClientTrainer:
    """Trains a piece of work for a simulated client; the same code runs in Flower's ClientApp."""

    def __init__(self, task: Task, clients: int, alpha: float) -> None:
        self.task = task
        self._data = cache(lambda node: task.client_data(node, clients, alpha))

    def __call__(self, work: Work, seed: int) -> TrainReply:
        x, y = self._data(work.node)
        delta = self.task.train(work.model, x, y, work.steps, seed)
        return TrainReply(delta, work.version, len(y), seconds_per_step=0.0, loss=float("nan"))


def run_in_process(run: RunConfig, spec: FleetSpec) -> VirtualResult:
    task = Task.create(spec.seed)
    coordinator = run.make_coordinator(task.initial_model())
    transport = InProcessTransport(ClientTrainer(task, spec.clients, spec.dirichlet_alpha))
    return run_virtual(coordinator, transport, spec.speed_list(), task.accuracy, spec.clock())


def summary(result: VirtualResult, target: float, budget: float) -> dict[str, float | int | None]:
    return {
        "time_to_target": result.curve.time_to(target),
        "acc_at_budget": result.curve.at(budget),
        "updates": result.updates,
        "aggregations": result.aggregations,
        "final_version": result.curve.versions[-1],
        "mean_updates_per_aggregation": float(np.mean(result.groups_per_aggregation or [0])),
    }
