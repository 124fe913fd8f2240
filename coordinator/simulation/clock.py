"""A virtual clock for simulated fleets: arrivals processed in virtual-time order.

Each client has a simulated speed (seconds per local step, drawn once from a
distribution by the seed) and each piece of work takes `steps * speed`
(times a seeded jitter) virtual seconds. The arrival time of every piece of
work is therefore known when it is sent, so the engine keeps a queue of
arrivals and the coordinator's deadline, and always handles whichever comes
first. Training itself is done by a `Transport`: in process (the benchmark)
or by Flower's simulation runtime (`lethe simulate`), which may finish the
work in any real order; the engine waits for the reply of the event it
handles next. Results depend on the seed, not on the machine.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from coordinator.core import Coordinator, Work, work_seed
from shared.fl_messages import TrainReply

SpeedDistribution = Literal["homogeneous", "normal", "exponential"]
SPEED_DISTRIBUTIONS: tuple[str, ...] = ("homogeneous", "normal", "exponential")


def draw_speeds(
    kind: str, clients: int, seed: int, mean: float = 1.0, floor: float = 0.05
) -> list[float]:
    """Seconds per local step for each client: all `mean`, N(mean, 0.3 mean) or Exp(mean).

    Draws are clipped below at `floor * mean` (a client cannot be infinitely
    fast). Client i's speed depends only on (seed, i), not on the fleet size.
    """
    if kind not in SPEED_DISTRIBUTIONS:
        raise ValueError(f"unknown speed distribution {kind!r}; choose {SPEED_DISTRIBUTIONS}")
    speeds = []
    for client in range(clients):
        rng = np.random.default_rng([seed, 2, client])
        if kind == "homogeneous":
            value = mean
        elif kind == "normal":
            value = rng.normal(mean, 0.3 * mean)
        else:
            value = rng.exponential(mean)
        speeds.append(max(float(value), floor * mean))
    return speeds


class Transport(Protocol):
    """Carries work to simulated clients and brings their replies back."""

    def send(self, work: Work, seed: int) -> object:
        """Start the work (training seeded by `seed`); returns a handle for `receive`."""

    def receive(self, handle: object) -> TrainReply | None:
        """Block until the reply is there; None when the client failed or is gone."""


@dataclass
class Curve:
    """Accuracy of each global version, with the virtual time it was committed."""

    times: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)

    def time_to(self, target: float) -> float | None:
        reached = (t for t, a in zip(self.times, self.accuracies, strict=True) if a >= target)
        return next(reached, None)

    def at(self, when: float) -> float:
        """Accuracy of the newest version committed by `when`."""
        best = self.accuracies[0]
        for t, a in zip(self.times, self.accuracies, strict=True):
            if t > when:
                break
            best = a
        return best


@dataclass(frozen=True)
class VirtualResult:
    curve: Curve
    updates: int
    rejected: int
    aggregations: int
    virtual_end: float
    wall_s: float
    coordinator_s: float
    dispatch_steps: dict[int, list[int]]  # node -> steps of each piece of work, in order
    groups_per_aggregation: list[int]  # how many updates each aggregation applied

    @property
    def overhead_ms_per_update(self) -> float:
        return 1000 * self.coordinator_s / max(self.updates, 1)


@dataclass(frozen=True)
class ClockConfig:
    budget: float  # virtual seconds
    jitter: float = 0.05  # each piece of work takes steps * speed * U(1 - j, 1 + j)
    latency: float = 0.0  # virtual seconds of communication per round trip
    seed: int = 0
    join_at: dict[int, float] = field(default_factory=dict)  # default: all at 0


def run_virtual(
    coordinator: Coordinator,
    transport: Transport,
    speeds: list[float],
    evaluate: Callable[[dict[str, np.ndarray]], float],
    config: ClockConfig,
) -> VirtualResult:
    """Run the fleet until the virtual budget is spent; evaluate every committed version."""
    started = time.perf_counter()
    counter = itertools.count()
    queue: list[tuple[float, int, str, int, object]] = []
    jitter = np.random.default_rng([config.seed, 3])
    for node in range(len(speeds)):
        heapq.heappush(queue, (config.join_at.get(node, 0.0), next(counter), "join", node, None))
    curve = Curve([0.0], [coordinator.version], [evaluate(coordinator.model)])
    steps_sent: dict[int, list[int]] = {node: [] for node in range(len(speeds))}
    now = 0.0

    def send(work: list[Work]) -> None:
        for piece in work:
            factor = 1 + config.jitter * (2 * jitter.random() - 1)
            arrival = piece.sent_at + piece.steps * speeds[piece.node] * factor + config.latency
            seed = work_seed(config.seed, piece.node, len(steps_sent[piece.node]))
            handle = transport.send(piece, seed)
            steps_sent[piece.node].append(piece.steps)
            heapq.heappush(queue, (arrival, next(counter), "arrive", piece.node, (piece, handle)))

    while True:
        next_event = queue[0][0] if queue else math.inf
        deadline = coordinator.deadline()
        aggregations = coordinator.counters.aggregations
        if deadline is not None and deadline <= next_event:
            now = max(now, deadline)
            if now > config.budget:
                break
            send(coordinator.tick(now))
        else:
            if not queue:
                break
            when, _, kind, node, payload = heapq.heappop(queue)
            now = when
            if now > config.budget:
                break
            if kind == "join":
                send(coordinator.join(node, now))
            else:
                piece, handle = payload  # type: ignore[misc]
                reply = transport.receive(handle)
                if reply is None:
                    send(coordinator.leave(node, now))
                else:
                    send(coordinator.arrive(node, reply.version, reply.delta, reply.samples, now))
        if coordinator.counters.aggregations > aggregations:
            curve.times.append(now)
            curve.versions.append(coordinator.version)
            curve.accuracies.append(evaluate(coordinator.model))
    return VirtualResult(
        curve=curve,
        updates=coordinator.counters.accepted,
        rejected=coordinator.counters.rejected,
        aggregations=coordinator.counters.aggregations,
        virtual_end=min(now, config.budget),
        wall_s=time.perf_counter() - started,
        coordinator_s=coordinator.counters.busy_s,
        dispatch_steps=steps_sent,
        groups_per_aggregation=[len(c.update_ids) for c in coordinator.history],
    )


class InProcessTransport:
    """Trains each piece of work right away, in this process (benchmarks, tests)."""

    def __init__(self, train: Callable[[Work, int], TrainReply | None]) -> None:
        self._train = train

    def send(self, work: Work, seed: int) -> object:
        return self._train(work, seed)

    def receive(self, handle: object) -> TrainReply | None:
        return handle  # type: ignore[return-value]
