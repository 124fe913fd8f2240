"""The wall-clock runner: nodes that join mid-run get work, an error reply makes a node leave
(and come back after the back-off), the deadline is ticked, and the run stops when asked."""

from __future__ import annotations

import numpy as np

from coordinator.core import Coordinator, Work
from coordinator.fedcompass import FedCompass, FedCompassConfig
from coordinator.runner import WallClockConfig, run_wall_clock
from coordinator.simulation.task import B_KEY
from shared.fl_messages import TrainReply

MODEL = {B_KEY: np.zeros((3, 2), np.float32)}


class ScriptedFleet:
    """Replies to work after steps x speed seconds of the test's clock; scripted failures."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.connected = {1: 0.0, 2: 0.0, 3: 40.0}  # node -> time it connects
        self.speed = {1: 1.0, 2: 1.5, 3: 1.0}
        self.fail_next = {2}  # node 2's first reply is an error (expired TTL)
        self.out: list[tuple[float, Work]] = []
        self.sent: list[Work] = []

    def node_ids(self) -> set[int]:
        return {node for node, at in self.connected.items() if self.clock[0] >= at}

    def send(self, work: Work, seed: int) -> None:
        self.sent.append(work)
        self.out.append((self.clock[0] + work.steps * self.speed[work.node], work))

    def poll(self) -> list[tuple[int, TrainReply | None]]:
        self.clock[0] += 1.0  # time passes between polls
        ready = [(t, w) for t, w in self.out if t <= self.clock[0]]
        self.out = [(t, w) for t, w in self.out if t > self.clock[0]]
        replies: list[tuple[int, TrainReply | None]] = []
        for _, work in ready:
            if work.node in self.fail_next:
                self.fail_next.discard(work.node)
                replies.append((work.node, None))
            else:
                delta = {B_KEY: np.full((3, 2), 0.1, np.float32)}
                replies.append((work.node, TrainReply(delta, work.version, 10, 1.0, 0.5)))
        return replies


def test_the_runner_handles_joins_errors_and_deadlines() -> None:
    clock = [0.0]
    fleet = ScriptedFleet(clock)
    policy = FedCompass(FedCompassConfig(q_min=5, q_max=20))
    core = Coordinator(policy, MODEL)
    wall = WallClockConfig(poll_s=0.0, discover_s=0.0, rejoin_after_s=15.0, max_versions=12)
    versions = []
    run_wall_clock(
        core,
        fleet,
        wall,
        clock=lambda: clock[0],
        should_stop=lambda: clock[0] > 2000,
        on_version=lambda v, _model: versions.append(v),
    )
    assert core.version >= 12 and versions == sorted(versions)
    nodes_sent = [w.node for w in fleet.sent]
    assert nodes_sent[:2] == [1, 2]  # connected at the start
    assert 3 in nodes_sent  # joined mid-run, got work
    first_of_3 = next(i for i, w in enumerate(fleet.sent) if w.node == 3)
    assert fleet.sent[first_of_3].version > 0
    # Node 2's error made it leave; it came back after the back-off and got new work.
    assert nodes_sent.count(2) >= 2
    assert core.counters.accepted >= 12 and core.counters.rejected == 0
    assert any(len(c.update_ids) >= 2 for c in core.history)  # groups aggregated together


def test_the_runner_stops_when_asked() -> None:
    clock = [0.0]
    fleet = ScriptedFleet(clock)
    core = Coordinator(FedCompass(), MODEL)
    run_wall_clock(
        core, fleet, WallClockConfig(poll_s=0.0), clock=lambda: clock[0], should_stop=lambda: True
    )
    assert fleet.sent == [] and core.version == 0


def test_a_node_that_owes_a_forgetting_gets_no_work_until_it_has_forgotten() -> None:
    clock = [0.0]
    fleet = ScriptedFleet(clock)
    fleet.fail_next = set()
    core = Coordinator(FedCompass(FedCompassConfig(q_min=5, q_max=20)), MODEL)
    asked_at, forgot_at = 50.0, 300.0  # a request waits for node 1 to forget, meanwhile

    def may_train(node: int) -> bool:
        return node != 1 or not asked_at <= clock[0] < forgot_at

    wall = WallClockConfig(poll_s=0.0, discover_s=0.0, rejoin_after_s=0.0)
    run_wall_clock(
        core, fleet, wall, clock=lambda: clock[0], should_stop=lambda: clock[0] > 600,
        may_train=may_train,
    )  # fmt: skip
    sent_to_1 = [w.sent_at for w in fleet.sent if w.node == 1]
    assert any(at < asked_at for at in sent_to_1)  # it trained before it was asked
    assert not any(asked_at <= at < forgot_at for at in sent_to_1)  # then nothing until it forgot
    assert any(at >= forgot_at for at in sent_to_1), "it never trained again after it forgot"
    assert any(w.node == 2 and w.sent_at < forgot_at for w in fleet.sent)  # the others went on


def test_work_a_killed_device_never_returns_is_given_up_and_the_device_gets_new_work() -> None:
    clock = [0.0]
    fleet = ScriptedFleet(clock)
    fleet.fail_next = set()
    killed_at, back_at = 100.0, 150.0
    swallowed: list[Work] = []  # work that reached node 1 while it was dead: no reply, ever
    poll = fleet.poll

    def lossy_poll() -> list[tuple[int, TrainReply | None]]:
        for reply_at, work in list(fleet.out):
            if work.node == 1 and reply_at > killed_at and work.sent_at < back_at:
                fleet.out.remove((reply_at, work))
                swallowed.append(work)
        return poll()

    fleet.poll = lossy_poll  # type: ignore[method-assign]
    core = Coordinator(FedCompass(FedCompassConfig(q_min=5, q_max=20)), MODEL)
    wall = WallClockConfig(poll_s=0.0, discover_s=0.0, lost_factor=2.0, lost_slack_s=20.0)
    run_wall_clock(core, fleet, wall, clock=lambda: clock[0], should_stop=lambda: clock[0] > 800)
    assert swallowed, "node 1 was never caught mid-training"
    lost = swallowed[0]
    later = [w for w in fleet.sent if w.node == 1 and w.sent_at > lost.sent_at]
    assert later, "node 1 never got work again"
    assert core.counters.accepted > 0 and core.version > 3  # the others went on meanwhile
