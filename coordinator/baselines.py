"""The policies FedCompass is measured against, behind the same interface.

- FedAvg (synchronous): everyone trains Q steps from the same version; the
  server waits for all of them, then applies the sample-weighted mean delta.
- FedBuff: arrivals are buffered; every K of them are applied together with
  weight rate * S(tau) / K, S(tau) = 1 / sqrt(1 + tau).
- FedAsync: every arrival is applied alone with weight alpha * S(tau), which
  is FedBuff with K = 1 and rate alpha, so it is written as exactly that.

All three apply deltas (x <- x + sum w_j delta_j). FedAsync's paper mixes
models, x <- (1 - a) x + a x_i; with x_i = x_base + delta that equals the
delta form exactly when the update is fresh (tau = 0) and differs for stale
ones by a (x_base - x). The delta form is what APPFL and FedBuff use, and it
lets every policy share one aggregator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from coordinator.policy import (
    Action,
    Aggregate,
    Arrival,
    Dispatch,
    Policy,
    Staleness,
    WeightedUpdate,
)


@dataclass(frozen=True)
class FedAvgConfig:
    local_steps: int = 50
    server_rate: float = 1.0


class FedAvg(Policy):
    name = "fedavg"

    def __init__(self, config: FedAvgConfig = FedAvgConfig()) -> None:
        super().__init__()
        self.config = config
        self.training: set[int] = set()
        self.arrived: list[Arrival] = []
        self.waiting: set[int] = set()  # joined while a round was under way

    def join(self, node: int, now: float) -> list[Action]:
        self.nodes.add(node)
        if self.arrived:  # the round has results already: take part from the next one
            self.waiting.add(node)
            return []
        self.training.add(node)
        return [Dispatch(node, self.config.local_steps, self.version)]

    def arrive(self, arrival: Arrival, now: float) -> list[Action]:
        if arrival.node not in self.training:
            raise ValueError(f"node {arrival.node} is not training in this round")
        self.training.discard(arrival.node)
        self.arrived.append(arrival)
        return self._close_round() if not self.training else []

    def leave(self, node: int, now: float) -> list[Action]:
        self.nodes.discard(node)
        self.waiting.discard(node)
        self.training.discard(node)
        return self._close_round() if not self.training and self.arrived else []

    def _close_round(self) -> list[Action]:
        total = sum(a.samples for a in self.arrived)
        updates = tuple(
            WeightedUpdate(
                a.update_id,
                a.node,
                self.config.server_rate * a.samples / total,
                self.version - a.base_version,
            )
            for a in self.arrived
        )
        self.version += 1
        nodes = sorted({a.node for a in self.arrived if a.node in self.nodes} | self.waiting)
        self.arrived, self.waiting, self.training = [], set(), set(nodes)
        return [Aggregate(updates, self.version)] + [
            Dispatch(n, self.config.local_steps, self.version) for n in nodes
        ]

    def snapshot(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "nodes": sorted(self.nodes),
            "training": sorted(self.training),
            "arrived": [asdict(a) for a in self.arrived],
            "waiting": sorted(self.waiting),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.version = int(state["version"])
        self.nodes = set(state["nodes"])
        self.training = set(state["training"])
        self.arrived = [Arrival(**a) for a in state["arrived"]]
        self.waiting = set(state["waiting"])


@dataclass(frozen=True)
class FedBuffConfig:
    local_steps: int = 50
    buffer_size: int = 3  # K; FedCompass's comparisons use K <= 5
    server_rate: float = 1.0
    staleness: Staleness = field(default_factory=lambda: Staleness("polynomial", a=0.5))


class FedBuff(Policy):
    name = "fedbuff"

    def __init__(self, config: FedBuffConfig = FedBuffConfig()) -> None:
        super().__init__()
        if config.buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, got {config.buffer_size}")
        self.config = config
        self.buffer: list[Arrival] = []

    def join(self, node: int, now: float) -> list[Action]:
        self.nodes.add(node)
        return [Dispatch(node, self.config.local_steps, self.version)]

    def arrive(self, arrival: Arrival, now: float) -> list[Action]:
        self.buffer.append(arrival)
        actions: list[Action] = []
        if len(self.buffer) >= self.config.buffer_size:
            k = len(self.buffer)
            updates = tuple(
                WeightedUpdate(
                    a.update_id,
                    a.node,
                    self.config.server_rate
                    * self.config.staleness(self.version - a.base_version)
                    / k,
                    self.version - a.base_version,
                )
                for a in self.buffer
            )
            self.buffer = []
            self.version += 1
            actions.append(Aggregate(updates, self.version))
        if arrival.node in self.nodes:
            actions.append(Dispatch(arrival.node, self.config.local_steps, self.version))
        return actions

    def leave(self, node: int, now: float) -> list[Action]:
        self.nodes.discard(node)
        return []

    def snapshot(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "nodes": sorted(self.nodes),
            "buffer": [asdict(a) for a in self.buffer],
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.version = int(state["version"])
        self.nodes = set(state["nodes"])
        self.buffer = [Arrival(**a) for a in state["buffer"]]


@dataclass(frozen=True)
class FedAsyncConfig:
    local_steps: int = 50
    alpha: float = 0.9
    staleness: Staleness = field(default_factory=Staleness)


class FedAsync(FedBuff):
    """FedBuff with a buffer of one: each arrival applied alone with weight alpha * S(tau)."""

    name = "fedasync"

    def __init__(self, config: FedAsyncConfig = FedAsyncConfig()) -> None:
        super().__init__(FedBuffConfig(config.local_steps, 1, config.alpha, config.staleness))
