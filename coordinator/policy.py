"""The scheduling-policy interface: events in, actions out, time from the caller.

A policy decides who trains how many local steps on which global version,
and which arrived updates are applied together with which weights. It does
no I/O and reads no clock: every call gets `now` from the runner, which is
the wall clock in deployment and a virtual clock in simulation, so one
implementation serves both. The runner feeds events one at a time from a
single thread (arrivals, departures, joins, and `tick` when `deadline()` has
passed), which is what serialises the deadline timer with arrivals.

Actions come back in the order the runner must carry them out: an
`Aggregate` first (it produces the version that the following `Dispatch`es
hand out).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Arrival:
    """An update as the policy sees it (the tensors stay with the runner).

    `update_id` is the runner's handle on the stored update; `base_version`
    the global version it was trained from; `dispatched_at` and `steps` come
    from the `Dispatch` it answers, so the policy can measure speed.
    """

    update_id: int
    node: int
    base_version: int
    steps: int
    dispatched_at: float
    samples: int = 1


@dataclass(frozen=True)
class WeightedUpdate:
    update_id: int
    node: int
    weight: float
    staleness: int


@dataclass(frozen=True)
class Aggregate:
    """Apply `x <- x + sum(weight * delta)` over `updates`; the result is `version`."""

    updates: tuple[WeightedUpdate, ...]
    version: int
    group: int | None = None


@dataclass(frozen=True)
class Dispatch:
    """Send `node` the global model of `version` to train `steps` local steps."""

    node: int
    steps: int
    version: int
    group: int | None = None


Action = Aggregate | Dispatch


@dataclass(frozen=True)
class Staleness:
    """S(tau): how much an update trained on a version `tau` behind counts.

    polynomial: (tau + 1) ** -a; hinge: 1 while tau <= b, then 1 / (a (tau - b) + 1);
    constant: 1. Each is 1 at tau = 0 and never grows with tau.
    """

    kind: Literal["constant", "polynomial", "hinge"] = "polynomial"
    a: float = 0.5
    b: float = 4.0

    def __call__(self, tau: int) -> float:
        if tau < 0:
            raise ValueError(f"staleness cannot be negative, got {tau}")
        if self.kind == "constant":
            return 1.0
        if self.kind == "polynomial":
            return (tau + 1) ** (-self.a)
        return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)


class Policy(ABC):
    """What every scheduling policy offers the runner."""

    name: str

    def __init__(self) -> None:
        self.version = 0  # the global model version, +1 at each Aggregate
        self.nodes: set[int] = set()

    @abstractmethod
    def join(self, node: int, now: float) -> list[Action]:
        """A node is available (at the start or mid-run); usually it gets work at once."""

    @abstractmethod
    def arrive(self, arrival: Arrival, now: float) -> list[Action]:
        """An update came back."""

    @abstractmethod
    def leave(self, node: int, now: float) -> list[Action]:
        """A node is gone (error reply, expired TTL): it trains nothing more until it joins."""

    def deadline(self) -> float | None:
        """The earliest time at which `tick` has something to do (None: nothing pending)."""
        return None

    def expected_seconds(self, node: int, steps: int) -> float | None:
        """How long `steps` local steps should take `node` (None: the policy does not know)."""
        return None

    def tick(self, now: float) -> list[Action]:
        """Called by the runner once `now >= deadline()`."""
        return []

    @abstractmethod
    def snapshot(self) -> dict[str, Any]:
        """The whole state as JSON-able plain data, to persist with each committed version."""

    @abstractmethod
    def restore(self, state: dict[str, Any]) -> None:
        """Take back a `snapshot`."""


def floor_steps(span: float, seconds_per_step: float) -> int:
    """Whole steps that fit in `span` seconds (0 when none fits)."""
    if seconds_per_step <= 0:
        raise ValueError(f"seconds per step must be positive, got {seconds_per_step}")
    return max(0, math.floor(span / seconds_per_step + 1e-9))
