"""FedCompass: semi-asynchronous scheduling that makes clients of different speed arrive together.

From "FedCompass" (ICLR 2024) as ../shared/ALGORITHMS.md states it. The server
estimates each client's seconds per local step and hands out local step
counts Q_i so that the members of an arrival group finish at about the same
time; a group is aggregated when its last member arrives, or at its latest
arrival time with whoever is there. Updates that come after their group was
aggregated wait in a general buffer for the next aggregation; their client
gets new work at once.

Differences from the reference implementation, on purpose:
- the deadline is not a timer thread: the runner calls `tick` from the same
  thread that delivers arrivals, so the two never race (the reference
  aggregates from its timer without the arrivals' lock);
- the staleness function has the minus sign, (tau + 1) ** -a, so a staler
  update counts less (one public version gave stale updates more weight);
- `normalise="updates"` divides the server step by the number of updates
  being aggregated instead of by the number of clients N; the notes found
  the paper's 1/N step too small with few updates per group. The default is
  the paper's; `lethe bench scheduling` measures both.
- `time_weighting` (Lethe's, off by default) scales each update's weight by
  min(1, span / period): span is how long its work took, period is Q_max
  times the median client's seconds per step. A client that returns every
  few seconds then counts, per unit of time, about as much as one that
  returns every few minutes, instead of as much per update: with very
  different speeds and non-IID data (an exponential fleet) the fastest
  client's data otherwise dominate the model. Measured in the bench.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from coordinator.policy import (
    Action,
    Aggregate,
    Arrival,
    Dispatch,
    Policy,
    Staleness,
    WeightedUpdate,
    floor_steps,
)


@dataclass(frozen=True)
class FedCompassConfig:
    """The reference defaults: Q in [20, 100], lambda 1.5, beta 0.9, alpha 0.9, (tau+1)^-0.5."""

    q_min: int = 20
    q_max: int = 100
    latest_factor: float = 1.5  # lambda: T_max = now + lambda * Q * s
    speed_momentum: float = 0.9  # beta: weight of the newest speed measurement
    server_rate: float = 0.9  # alpha
    staleness: Staleness = field(default_factory=Staleness)
    normalise: Literal["clients", "updates"] = "clients"
    time_weighting: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.q_min <= self.q_max:
            raise ValueError(f"need 1 <= q_min <= q_max, got {self.q_min}, {self.q_max}")
        if self.latest_factor < 1:
            raise ValueError(f"latest_factor must be at least 1, got {self.latest_factor}")
        if not 0 < self.speed_momentum <= 1 or not self.server_rate > 0:
            raise ValueError("need 0 < speed_momentum <= 1 and server_rate > 0")


@dataclass
class Group:
    """An arrival group: who still trains, who has arrived (their updates wait here)."""

    id: int
    expected: float
    latest: float
    training: set[int]
    arrived: list[Arrival]


class FedCompass(Policy):
    name = "fedcompass"

    def __init__(self, config: FedCompassConfig = FedCompassConfig()) -> None:
        super().__init__()
        self.config = config
        self.speeds: dict[int, float] = {}  # seconds per local step, estimated
        self.group_of: dict[int, int] = {}  # node -> group it trains for
        self.groups: dict[int, Group] = {}
        self.general: list[Arrival] = []  # late updates, applied at the next aggregation
        self._next_group = 0

    # -- events ---------------------------------------------------------------

    def join(self, node: int, now: float) -> list[Action]:
        self.nodes.add(node)
        if node in self.speeds:  # a node that comes back: its speed is known
            return [self._assign(node, now)]
        return [Dispatch(node, self.config.q_max, self.version)]

    def arrive(self, arrival: Arrival, now: float) -> list[Action]:
        node = arrival.node
        if node not in self.nodes:
            raise ValueError(f"node {node} is not taking part")
        first = node not in self.speeds
        self._measure(arrival, now)
        if first:
            return [self._apply([arrival], None, now), self._assign(node, now)]
        group = self.groups.get(self.group_of.pop(node, -1))
        if group is None or now > group.latest:  # its group has been aggregated: late
            self.general.append(arrival)
            actions = [] if group is None else self._without(node, group, now)
            return [*actions, self._assign(node, now)]
        group.training.discard(node)
        group.arrived.append(arrival)
        return self._aggregate(group, now) if not group.training else []

    def leave(self, node: int, now: float) -> list[Action]:
        """The node leaves its group; the group keeps its deadline (or closes if all are in)."""
        self.nodes.discard(node)
        group = self.groups.get(self.group_of.pop(node, -1))
        return [] if group is None else self._without(node, group, now)

    def deadline(self) -> float | None:
        return min((g.latest for g in self.groups.values()), default=None)

    def expected_seconds(self, node: int, steps: int) -> float | None:
        speed = self.speeds.get(node)
        return None if speed is None else speed * steps

    def tick(self, now: float) -> list[Action]:
        """Aggregate every group whose latest arrival time has passed, with whoever arrived.

        Members still training are cut loose: when they arrive they are late.
        """
        actions: list[Action] = []
        for group in sorted(self.groups.values(), key=lambda g: (g.latest, g.id)):
            if group.latest > now:
                break
            for node in group.training:
                self.group_of.pop(node, None)
            group.training = set()
            if group.arrived or self.general:
                actions += self._aggregate(group, now)
            else:
                del self.groups[group.id]
        return actions

    # -- inside -----------------------------------------------------------------

    def _measure(self, arrival: Arrival, now: float) -> None:
        observed = max(now - arrival.dispatched_at, 1e-9) / arrival.steps
        known = self.speeds.get(arrival.node)
        beta = self.config.speed_momentum
        estimate = observed if known is None else (1 - beta) * known + beta * observed
        self.speeds[arrival.node] = estimate

    def _without(self, node: int, group: Group, now: float) -> list[Action]:
        """`node` no longer trains for `group`: the group closes if it waits for nobody else
        (aggregated if anyone arrived, dropped if not: an empty group has no speed to plan by)."""
        group.training.discard(node)
        if group.training:
            return []
        if group.arrived:
            return self._aggregate(group, now)
        del self.groups[group.id]
        return []

    def _aggregate(self, group: Group, now: float) -> list[Action]:
        """Apply the general buffer and the group's updates as one step; re-assign the group."""
        updates = self.general + group.arrived
        self.general = []
        del self.groups[group.id]
        actions: list[Action] = [self._apply(updates, group.id, now)]
        waiting = sorted(
            (a.node for a in group.arrived if a.node in self.nodes),
            key=lambda n: (self.speeds[n], n),
        )
        actions += [self._assign(node, now) for node in waiting]
        return actions

    def _apply(self, updates: list[Arrival], group: int | None, now: float) -> Aggregate:
        divisor = len(self.nodes) if self.config.normalise == "clients" else len(updates)
        period = (
            self.config.q_max * statistics.median(self.speeds.values())
            if self.config.time_weighting
            else 0.0
        )
        weighted = []
        for arrival in updates:
            tau = self.version - arrival.base_version
            weight = self.config.server_rate * self.config.staleness(tau) / max(divisor, 1)
            if self.config.time_weighting:
                weight *= min(1.0, (now - arrival.dispatched_at) / period)
            weighted.append(WeightedUpdate(arrival.update_id, arrival.node, weight, tau))
        self.version += 1
        return Aggregate(tuple(weighted), self.version, group)

    def _assign(self, node: int, now: float) -> Dispatch:
        """Join the open group this node can reach with the most steps, or open a new one."""
        speed = self.speeds[node]
        cfg = self.config
        best: tuple[int, int] | None = None  # (q, -group id)
        for group in self.groups.values():
            q = floor_steps(group.expected - now, speed)
            if cfg.q_min <= q <= cfg.q_max and (best is None or (q, -group.id) > best):
                best = (q, -group.id)
        if best is not None:
            q, group_id = best[0], -best[1]
            self.groups[group_id].training.add(node)
            self.group_of[node] = group_id
            return Dispatch(node, q, self.version, group_id)
        candidates = []
        for group in self.groups.values():
            fastest = min(self.speeds[n] for n in self._members(group))
            q = floor_steps(group.latest + fastest * cfg.q_max - now, speed)
            if q <= cfg.q_max:
                candidates.append(q)
        q = max(max(candidates, default=cfg.q_max), cfg.q_min)
        group = Group(
            id=self._next_group,
            expected=now + q * speed,
            latest=now + cfg.latest_factor * q * speed,
            training={node},
            arrived=[],
        )
        self._next_group += 1
        self.groups[group.id] = group
        self.group_of[node] = group.id
        return Dispatch(node, q, self.version, group.id)

    def _members(self, group: Group) -> list[int]:
        members = list(group.training) + [a.node for a in group.arrived]
        return [n for n in members if n in self.speeds]

    # -- persistence -------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "nodes": sorted(self.nodes),
            "speeds": {str(n): s for n, s in self.speeds.items()},
            "group_of": {str(n): g for n, g in self.group_of.items()},
            "groups": [
                {
                    "id": g.id,
                    "expected": g.expected,
                    "latest": g.latest,
                    "training": sorted(g.training),
                    "arrived": [asdict(a) for a in g.arrived],
                }
                for g in self.groups.values()
            ],
            "general": [asdict(a) for a in self.general],
            "next_group": self._next_group,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.version = int(state["version"])
        self.nodes = set(state["nodes"])
        self.speeds = {int(n): float(s) for n, s in state["speeds"].items()}
        self.group_of = {int(n): int(g) for n, g in state["group_of"].items()}
        self.groups = {
            g["id"]: Group(
                id=g["id"],
                expected=g["expected"],
                latest=g["latest"],
                training=set(g["training"]),
                arrived=[Arrival(**a) for a in g["arrived"]],
            )
            for g in state["groups"]
        }
        self.general = [Arrival(**a) for a in state["general"]]
        self._next_group = int(state["next_group"])
