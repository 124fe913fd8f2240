"""The coordinator's core: a policy, the global shared adapter, and what is in flight.

Transport-free and clock-free. A runner (the Flower ServerApp on the wall
clock, the simulation on a virtual clock) feeds it events one at a time:
`join`, `arrive`, `leave`, and `tick` whenever `deadline()` has passed; it
gets back the work to send (`Work`: node, steps, version and the model).
One thread feeds it, so deadlines and arrivals cannot race.

Every update is checked before the policy hears of it (`check_update`); a
rejected one is logged and counted, nothing of it is applied. A node whose
updates are rejected `quarantine_after` times in a row is quarantined: it
leaves the policy, gets no more work in this run (the journal keeps that
across restarts), and anything it still sends is rejected and counted. When a
`Journal` is attached (the durable state store), everything one event did
(the update accepted, the versions committed with the ids of the updates
they applied, the policy's state, the work in flight) is handed to it as one
`EventRecord` and written in one transaction before any work is sent. A
crash therefore leaves the state before the event or after it: an accepted
update is never lost (it is pending or applied) and never applied twice.
After a restart (`restore`), work that was in flight went to a process that
is gone; `reissue` hands those nodes new work on the committed model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from coordinator.aggregation import (
    RobustRule,
    UpdateLimits,
    UpdateRejected,
    apply_updates,
    check_update,
)
from coordinator.policy import Action, Aggregate, Arrival, Dispatch, Policy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Work:
    """What to send a node: train `steps` local steps from `model` (version `version`)."""

    node: int
    steps: int
    version: int
    model: dict[str, np.ndarray]
    group: int | None
    sent_at: float


def work_seed(seed: int, node: int, index: int, version: int = 0) -> int:
    """The training seed of a node's `index`-th piece of work: fixed by the run's seed."""
    return int(np.random.default_rng([seed, 4, node, index, version]).integers(2**31))


@dataclass(frozen=True)
class InFlight:
    version: int
    steps: int
    sent_at: float
    group: int | None


@dataclass(frozen=True)
class Committed:
    """One aggregation as it was committed: which updates, with which weights."""

    version: int
    at: float
    update_ids: tuple[int, ...]
    nodes: tuple[int, ...]
    weights: tuple[float, ...]
    staleness: tuple[int, ...]
    group: int | None


@dataclass(frozen=True)
class AcceptedUpdate:
    update_id: int
    node: int
    base_version: int
    steps: int
    delta: dict[str, np.ndarray]


@dataclass
class EventRecord:
    """Everything one event changed, for the journal to write as one transaction."""

    at: float = 0.0
    accepted: AcceptedUpdate | None = None
    rejected: tuple[int, int, str] | None = None  # node, version, reason
    quarantined: int | None = None  # a node this event quarantined
    touched: set[int] = field(default_factory=set)  # nodes whose state the event changed
    commits: list[tuple[Committed, dict[str, np.ndarray]]] = field(default_factory=list)
    policy_state: dict[str, Any] = field(default_factory=dict)
    in_flight: dict[int, InFlight] = field(default_factory=dict)
    next_update_id: int = 1


@dataclass(frozen=True)
class SavedState:
    """What a journal gives back after a restart."""

    model: dict[str, np.ndarray]
    policy_state: dict[str, Any]
    in_flight: dict[int, InFlight]
    pending: dict[int, tuple[int, dict[str, np.ndarray]]]
    next_update_id: int
    quarantined: frozenset[int] = frozenset()


class Journal(Protocol):
    """Where the core records what must survive a crash (`coordinator.state`)."""

    def record(self, event: EventRecord) -> None: ...


@dataclass
class Counters:
    accepted: int = 0
    rejected: int = 0
    aggregations: int = 0
    busy_s: float = 0.0  # time inside policy and aggregation, for the overhead figure


class Coordinator:
    def __init__(
        self,
        policy: Policy,
        model: Mapping[str, np.ndarray],
        limits: UpdateLimits | None = None,
        journal: Journal | None = None,
        rule: RobustRule | None = None,
    ) -> None:
        self.policy = policy
        self.model = {k: np.asarray(v, dtype=np.float32) for k, v in model.items()}
        self.template = self.model
        self.limits = limits or UpdateLimits()
        self.rule = rule or RobustRule()
        self.journal = journal
        self.strikes: dict[int, int] = {}  # rejections in a row, per node
        self.quarantined: set[int] = set()
        self.in_flight: dict[int, InFlight] = {}
        self.pending: dict[int, tuple[int, dict[str, np.ndarray]]] = {}  # id -> (node, delta)
        self.history: list[Committed] = []
        self.counters = Counters()
        self._next_update = 1

    @property
    def version(self) -> int:
        return self.policy.version

    # -- events -----------------------------------------------------------------

    def join(self, node: int, now: float) -> list[Work]:
        if node in self.quarantined:
            return []
        event = EventRecord(touched={node})
        return self._event(event, lambda: self.policy.join(node, now), now)

    def leave(self, node: int, now: float) -> list[Work]:
        self.in_flight.pop(node, None)
        event = EventRecord(touched={node})
        return self._event(event, lambda: self.policy.leave(node, now), now)

    def deadline(self) -> float | None:
        return self.policy.deadline()

    def tick(self, now: float) -> list[Work]:
        return self._event(EventRecord(), lambda: self.policy.tick(now), now)

    def arrive(
        self,
        node: int,
        version: int,
        delta: Mapping[str, np.ndarray],
        samples: int,
        now: float,
    ) -> list[Work]:
        """Check an update; if it passes, let the policy act on it."""
        started = time.perf_counter()
        flight = self.in_flight.get(node)
        try:
            if node in self.quarantined:
                raise UpdateRejected(f"node {node} is quarantined")
            checked = check_update(
                delta,
                self.template,
                self.limits,
                node=node,
                nodes=self.policy.nodes,
                version=version,
                expected_version=None if flight is None else flight.version,
            )
        except UpdateRejected as error:
            self.counters.rejected += 1
            log.warning("rejected update from node %d: %s", node, error)
            self.counters.busy_s += time.perf_counter() - started
            event = EventRecord(rejected=(node, version, str(error)), touched={node})
            return self._event(event, lambda: self._strike(node, version, event, now), now)
        assert flight is not None  # check_update refused the update otherwise
        self.strikes.pop(node, None)
        del self.in_flight[node]
        update_id = self._next_update
        self._next_update += 1
        self.pending[update_id] = (node, checked)
        self.counters.accepted += 1
        arrival = Arrival(update_id, node, version, flight.steps, flight.sent_at, max(samples, 1))
        self.counters.busy_s += time.perf_counter() - started
        event = EventRecord(
            accepted=AcceptedUpdate(update_id, node, version, flight.steps, checked),
            touched={node},
        )
        return self._event(event, lambda: self.policy.arrive(arrival, now), now)

    def _strike(self, node: int, version: int, event: EventRecord, now: float) -> list[Action]:
        """A node that answered its own work with a bad update: that work is over (the
        runner lets it join again for new work), and too many in a row quarantine it. A
        stray, late or replayed update is rejected and counted but is no strike: the node's
        real work may still be out, and a slow honest node must not be shut out for it."""
        flight = self.in_flight.get(node)
        if node in self.quarantined or flight is None or flight.version != version:
            return []
        self.strikes[node] = self.strikes.get(node, 0) + 1
        limit = self.limits.quarantine_after
        if limit and self.strikes[node] >= limit:
            self.quarantined.add(node)
            event.quarantined = node
            log.warning("node %d quarantined after %d rejected updates in a row", node, limit)
        del self.in_flight[node]
        return self.policy.leave(node, now) if node in self.policy.nodes else []

    # -- restart ----------------------------------------------------------------

    def restore(self, saved: SavedState) -> None:
        """Take back the journal's state (the policy must be of the kind that saved it)."""
        self.model = {k: np.asarray(v, dtype=np.float32) for k, v in saved.model.items()}
        self.policy.restore(saved.policy_state)
        self.in_flight = dict(saved.in_flight)
        self.pending = dict(saved.pending)
        self._next_update = saved.next_update_id
        self.quarantined = set(saved.quarantined)

    def reissue(self, now: float) -> list[Work]:
        """New work for every node whose work was in flight when the last process stopped."""
        work: list[Work] = []
        for node in sorted(self.in_flight):
            work += self.leave(node, now)
            work += self.join(node, now)
        return work

    # -- inside -----------------------------------------------------------------

    def _event(
        self, event: EventRecord, decide: Callable[[], list[Action]], now: float
    ) -> list[Work]:
        started = time.perf_counter()
        work: list[Work] = []
        for action in decide():
            if isinstance(action, Aggregate):
                event.commits.append(self._aggregate(action, now))
            else:
                work.append(self._dispatch(action, now))
                event.touched.add(action.node)
        if self.journal is not None:
            event.at = now
            event.policy_state = self.policy.snapshot()
            event.in_flight = dict(self.in_flight)
            event.next_update_id = self._next_update
            self.journal.record(event)
        self.counters.busy_s += time.perf_counter() - started
        return work

    def _aggregate(self, action: Aggregate, now: float) -> tuple[Committed, dict[str, np.ndarray]]:
        weighted = [(u.weight, self.pending[u.update_id][1]) for u in action.updates]
        self.model = apply_updates(self.model, weighted, self.rule)
        committed = Committed(
            version=action.version,
            at=now,
            update_ids=tuple(u.update_id for u in action.updates),
            nodes=tuple(u.node for u in action.updates),
            weights=tuple(u.weight for u in action.updates),
            staleness=tuple(u.staleness for u in action.updates),
            group=action.group,
        )
        for update_id in committed.update_ids:
            del self.pending[update_id]
        self.history.append(committed)
        self.counters.aggregations += 1
        return committed, self.model

    def _dispatch(self, action: Dispatch, now: float) -> Work:
        self.in_flight[action.node] = InFlight(action.version, action.steps, now, action.group)
        return Work(action.node, action.steps, action.version, self.model, action.group, now)
