"""The wall-clock runner: the coordinator's loop in deployment.

It polls: new nodes join, replies are taken as they come (an error reply or a
node that disappeared makes the node leave; a node that is still connected
joins again at the next discovery), the deadline is ticked when it has
passed, and the work these produce is sent at once. Everything happens in
this one thread, so the deadline and arrivals never race. The `Fleet` is
Flower's Grid in the ServerApp (`coordinator.server_app.GridFleet`) and a
pool of local threads in tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from coordinator.core import Coordinator, Work, work_seed
from shared.fl_messages import TrainReply

log = logging.getLogger(__name__)


class Fleet(Protocol):
    def node_ids(self) -> set[int]:
        """The nodes connected now."""

    def send(self, work: Work, seed: int) -> None: ...

    def poll(self) -> list[tuple[int, TrainReply | None]]:
        """Replies that came in since the last poll; None for an error reply."""


@dataclass(frozen=True)
class WallClockConfig:
    poll_s: float = 0.05
    discover_s: float = 1.0
    rejoin_after_s: float = 10.0  # a node whose work failed waits this long before new work
    # Work not back after lost_factor x its expected time + lost_slack_s is given up (the
    # device died mid-training and its message will only expire with its TTL): the node
    # leaves and, still or again connected, joins for new work.
    lost_factor: float = 4.0
    lost_slack_s: float = 30.0
    max_versions: int = 0  # stop after this version is committed (0: never)
    time_limit_s: float | None = None
    seed: int = 0


def run_wall_clock(
    core: Coordinator,
    fleet: Fleet,
    config: WallClockConfig,
    *,
    resumed: bool = False,
    clock: Callable[[], float] = time.time,
    should_stop: Callable[[], bool] = lambda: False,
    on_version: Callable[[int, dict[str, np.ndarray]], None] | None = None,
    between: Callable[[], None] | None = None,
    may_train: Callable[[int], bool] = lambda _node: True,
) -> None:
    """Run until `max_versions`, the time limit, or `should_stop()`.

    `may_train(node)` False holds a node's work back (it leaves the policy and joins again
    once it may): a device that owes a forgetting gets no training until it has forgotten.
    `between` runs once per loop, after the scheduling work (the deletion
    propagation), in this same thread: nothing it touches races the core.
    """
    started = clock()
    sent: dict[int, int] = {}  # node -> pieces of work sent, for the seeds
    last_discovery = -float("inf")
    reported = core.version
    failed_at: dict[int, float] = {}

    def dispatch(work: list[Work]) -> None:
        for piece in work:
            if not may_train(piece.node):  # it must forget someone first: no work until then
                log.info("node %d holds work back until it has forgotten", piece.node)
                dispatch(core.leave(piece.node, clock()))
                continue
            index = sent.get(piece.node, 0)
            sent[piece.node] = index + 1
            # The version makes seeds differ after a restart, when the counts start again.
            fleet.send(piece, work_seed(config.seed, piece.node, index, piece.version))

    if resumed:
        dispatch(core.reissue(clock()))
    while not should_stop():
        now = clock()
        if now - last_discovery >= config.discover_s:
            last_discovery = now
            connected = fleet.node_ids()
            for node in sorted(connected - core.policy.nodes - core.quarantined):
                if now - failed_at.get(node, -float("inf")) < config.rejoin_after_s:
                    continue
                if not may_train(node):
                    continue
                log.info("node %d joins", node)
                dispatch(core.join(node, now))
            for node in sorted(core.policy.nodes - connected):
                log.info("node %d is gone", node)
                dispatch(core.leave(node, now))
        for node, reply in fleet.poll():
            now = clock()
            if reply is None:
                failed_at[node] = now
                dispatch(core.leave(node, now))
            else:
                dispatch(core.arrive(node, reply.version, reply.delta, reply.samples, now))
        for node, flight in list(core.in_flight.items()):
            expected = core.policy.expected_seconds(node, flight.steps)
            now = clock()
            if expected is not None and now - flight.sent_at > (
                config.lost_factor * expected + config.lost_slack_s
            ):
                log.warning("node %d: work sent %.0f s ago is given up", node, now - flight.sent_at)
                dispatch(core.leave(node, now))
        deadline = core.deadline()
        if deadline is not None and clock() >= deadline:
            dispatch(core.tick(clock()))
        if core.version != reported:
            reported = core.version
            if on_version is not None:
                on_version(core.version, core.model)
        if between is not None:
            between()
        if config.max_versions and core.version >= config.max_versions:
            break
        if config.time_limit_s is not None and clock() - started >= config.time_limit_s:
            break
        time.sleep(config.poll_s)
