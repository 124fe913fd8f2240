"""FedCompass as specified: speeds, Q_i, arrival groups, deadlines, late arrivals, staleness."""

from __future__ import annotations

import pytest

from coordinator.fedcompass import FedCompass, FedCompassConfig, Group
from coordinator.policy import Aggregate, Arrival, Dispatch, Staleness

CONFIG = FedCompassConfig(q_min=20, q_max=100, latest_factor=1.5)


class Fleet:
    """Drives a policy by hand: remembers what each node was sent, delivers its reply."""

    def __init__(self, policy: FedCompass) -> None:
        self.policy = policy
        self.sent: dict[int, Dispatch] = {}
        self.sent_at: dict[int, float] = {}
        self.next_id = 0
        self.aggregates: list[Aggregate] = []

    def take(self, actions, now: float):
        for action in actions:
            if isinstance(action, Dispatch):
                self.sent[action.node] = action
                self.sent_at[action.node] = now
            else:
                self.aggregates.append(action)
        return actions

    def join(self, node: int, now: float = 0.0):
        return self.take(self.policy.join(node, now), now)

    def arrive(self, node: int, now: float):
        self.next_id += 1
        work = self.sent[node]
        arrival = Arrival(self.next_id, node, work.version, work.steps, self.sent_at[node])
        return self.take(self.policy.arrive(arrival, now), now)


def test_first_work_is_q_max_and_a_first_return_is_aggregated_alone() -> None:
    fleet = Fleet(FedCompass(CONFIG))
    [first] = fleet.join(0)
    assert first == Dispatch(0, 100, 0)
    actions = fleet.arrive(0, now=100.0)  # 1 s per step
    assert isinstance(actions[0], Aggregate) and len(actions[0].updates) == 1
    assert actions[0].version == 1 and fleet.policy.version == 1
    assert isinstance(actions[1], Dispatch) and actions[1].version == 1
    assert fleet.policy.speeds[0] == pytest.approx(1.0)


def test_speed_estimate_keeps_the_first_value_then_leans_on_the_newest() -> None:
    policy = FedCompass(CONFIG)
    policy.join(0, 0.0)
    policy.arrive(Arrival(1, 0, 0, 100, 0.0), 200.0)  # 2 s/step
    assert policy.speeds[0] == pytest.approx(2.0)
    policy.arrive(Arrival(2, 0, 1, 10, 200.0), 210.0)  # 1 s/step
    assert policy.speeds[0] == pytest.approx(0.1 * 2.0 + 0.9 * 1.0)


def test_a_client_joins_the_feasible_group_with_the_most_steps() -> None:
    policy = FedCompass(CONFIG)
    policy.nodes = {0, 1, 2}
    policy.speeds = {0: 1.0, 1: 1.0, 2: 2.0}
    policy.groups = {
        0: Group(0, expected=150.0, latest=200.0, training={0}, arrived=[]),
        1: Group(1, expected=190.0, latest=250.0, training={1}, arrived=[]),
    }
    policy._next_group = 2
    work = policy._assign(2, now=100.0)
    # Group 0 gives floor(50 / 2) = 25 steps, group 1 floor(90 / 2) = 45: both feasible.
    assert work.group == 1 and work.steps == 45
    assert 2 in policy.groups[1].training


def test_without_a_feasible_group_a_new_one_is_aimed_just_after_the_others() -> None:
    policy = FedCompass(CONFIG)
    policy.nodes = {0, 1}
    policy.speeds = {0: 1.0, 1: 0.5}
    policy.groups = {0: Group(0, expected=105.0, latest=110.0, training={0}, arrived=[])}
    policy._next_group = 1
    work = policy._assign(1, now=100.0)  # floor(5 / 0.5) = 10 < q_min: not feasible
    # T_est = 110 + 1.0 * 100 = 210 -> floor(110 / 0.5) = 220 > q_max: no candidate, Q_max.
    assert work.group == 1 and work.steps == 100
    group = policy.groups[1]
    assert group.expected == pytest.approx(150.0) and group.latest == pytest.approx(175.0)


def test_new_group_q_from_the_estimated_time_of_existing_groups() -> None:
    policy = FedCompass(CONFIG)
    policy.nodes = {0, 1}
    policy.speeds = {0: 1.0, 1: 4.0}
    policy.groups = {0: Group(0, expected=101.0, latest=140.0, training={0}, arrived=[])}
    policy._next_group = 1
    work = policy._assign(1, now=100.0)
    # T_est = 140 + 1 * 100 = 240 -> floor(140 / 4) = 35 steps.
    assert work.steps == 35 and policy.groups[1].expected == pytest.approx(240.0)


def test_a_group_is_aggregated_when_its_last_member_arrives() -> None:
    policy = FedCompass(CONFIG)
    policy.nodes = {0, 1}
    policy.speeds = {0: 1.0, 1: 2.0}
    policy.version = 5
    policy.groups = {0: Group(0, expected=200.0, latest=250.0, training={0, 1}, arrived=[])}
    policy.group_of = {0: 0, 1: 0}
    assert policy.arrive(Arrival(1, 0, 5, 100, 100.0), 200.0) == []  # node 1 still trains
    actions = policy.arrive(Arrival(2, 1, 4, 50, 100.0), 201.0)
    aggregate = actions[0]
    assert isinstance(aggregate, Aggregate) and aggregate.group == 0
    assert {u.node for u in aggregate.updates} == {0, 1}
    # Staleness: node 1 trained from version 4, one behind: weight 0.9 * 2**-0.5 / 2.
    weights = {u.node: u.weight for u in aggregate.updates}
    assert weights[0] == pytest.approx(0.9 / 2)
    assert weights[1] == pytest.approx(0.9 * 2**-0.5 / 2)
    dispatched = [a for a in actions if isinstance(a, Dispatch)]
    assert [d.node for d in dispatched] == [0, 1]  # fastest first
    assert all(d.version == 6 for d in dispatched)


def test_the_deadline_aggregates_whoever_arrived_and_the_rest_come_late() -> None:
    policy = FedCompass(CONFIG)
    policy.nodes = {0, 1}
    policy.speeds = {0: 1.0, 1: 1.0}
    policy.groups = {0: Group(0, expected=200.0, latest=250.0, training={0, 1}, arrived=[])}
    policy.group_of = {0: 0, 1: 0}
    policy.arrive(Arrival(1, 0, 0, 100, 100.0), 200.0)
    assert policy.deadline() == 250.0
    assert policy.tick(249.0) == []
    actions = policy.tick(250.0)
    assert isinstance(actions[0], Aggregate) and [u.node for u in actions[0].updates] == [0]
    assert policy.version == 1
    # Node 1 arrives after the deadline: into the general buffer, new work at once.
    late = policy.arrive(Arrival(2, 1, 0, 100, 100.0), 400.0)
    assert [type(a) for a in late] == [Dispatch] and late[0].node == 1
    assert [a.update_id for a in policy.general] == [2]
    # ... and it is applied (staleness 2 by then) at the next group aggregation.
    group = policy.groups[policy.group_of[0]]
    assert group.training == {0}  # node 0 got new work in a group of its own
    actions = policy.arrive(Arrival(3, 0, 1, 50, 250.0), 300.0)
    applied = {u.update_id: u.staleness for u in actions[0].updates}
    assert applied == {2: 1, 3: 0} and policy.general == []


def test_a_late_arrival_before_the_deadline_tick_closes_its_emptied_group() -> None:
    # Seen on a real fleet: the deadline passed but no tick ran yet, and the late node was
    # the group's last member with nothing arrived. The empty group must go (it has no
    # speed to plan a new group by), and the late node gets work at once.
    policy = FedCompass(CONFIG)
    policy.nodes = {0, 1}
    policy.speeds = {0: 1.0, 1: 3.0}
    policy.groups = {
        0: Group(0, expected=200.0, latest=250.0, training={0}, arrived=[]),
        1: Group(1, expected=300.0, latest=350.0, training={1}, arrived=[]),
    }
    policy.group_of = {0: 0, 1: 1}
    actions = policy.arrive(Arrival(1, 0, 0, 100, 100.0), 260.0)
    assert [type(a) for a in actions] == [Dispatch] and actions[0].node == 0
    assert 0 not in policy.groups or policy.groups[0].training == {0}
    assert [a.update_id for a in policy.general] == [1]


def test_a_node_that_leaves_does_not_hold_its_group() -> None:
    policy = FedCompass(CONFIG)
    policy.nodes = {0, 1, 2}
    policy.speeds = {0: 1.0, 1: 1.0, 2: 1.0}
    policy.groups = {0: Group(0, expected=200.0, latest=250.0, training={0, 1, 2}, arrived=[])}
    policy.group_of = {0: 0, 1: 0, 2: 0}
    policy.arrive(Arrival(1, 0, 0, 100, 100.0), 200.0)
    assert policy.leave(2, 210.0) == []  # node 1 still trains: the deadline still holds
    assert policy.deadline() == 250.0 and 2 not in policy.nodes
    actions = policy.leave(1, 220.0)  # nobody left training: aggregate those who arrived
    assert isinstance(actions[0], Aggregate) and [u.node for u in actions[0].updates] == [0]


def test_staleness_functions_never_reward_staleness() -> None:
    for staleness in (Staleness("polynomial", a=0.5), Staleness("hinge", a=1.0, b=2)):
        values = [staleness(t) for t in range(20)]
        assert values[0] == 1.0
        assert all(b <= a for a, b in zip(values, values[1:], strict=False))
        assert values[-1] < 1.0
    with pytest.raises(ValueError):
        Staleness()(-1)


def test_snapshot_and_restore_continue_identically() -> None:
    fleet = Fleet(FedCompass(CONFIG))
    for node in range(3):
        fleet.join(node)
    fleet.arrive(0, 100.0)
    fleet.arrive(1, 150.0)
    twin = FedCompass(CONFIG)
    twin.restore(fleet.policy.snapshot())
    assert twin.snapshot() == fleet.policy.snapshot()
    arrival = Arrival(99, 2, 0, 100, 0.0)
    assert twin.arrive(arrival, 300.0) == fleet.policy.arrive(arrival, 300.0)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        FedCompassConfig(q_min=50, q_max=20)
    with pytest.raises(ValueError):
        FedCompassConfig(latest_factor=0.5)
