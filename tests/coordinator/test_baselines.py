"""FedAvg, FedAsync and FedBuff behind the policy interface, and the run config that picks one."""

from __future__ import annotations

import pytest

from coordinator.baselines import FedAsync, FedAvg, FedAvgConfig, FedBuff, FedBuffConfig
from coordinator.fedcompass import FedCompass
from coordinator.policy import Aggregate, Arrival, Dispatch
from coordinator.run_config import RunConfig


def test_fedavg_waits_for_everyone_and_weights_by_samples() -> None:
    policy = FedAvg(FedAvgConfig(local_steps=10))
    assert policy.join(0, 0.0) == [Dispatch(0, 10, 0)]
    assert policy.join(1, 0.0) == [Dispatch(1, 10, 0)]
    assert policy.arrive(Arrival(1, 0, 0, 10, 0.0, samples=30), 5.0) == []
    policy.join(2, 6.0)  # joins mid-round: waits for the next one
    actions = policy.arrive(Arrival(2, 1, 0, 10, 0.0, samples=10), 50.0)
    aggregate = actions[0]
    assert isinstance(aggregate, Aggregate) and aggregate.version == 1
    assert {u.node: u.weight for u in aggregate.updates} == {0: 0.75, 1: 0.25}
    assert [(d.node, d.version) for d in actions[1:]] == [(0, 1), (1, 1), (2, 1)]


def test_fedavg_does_not_wait_for_a_node_that_left() -> None:
    policy = FedAvg()
    policy.join(0, 0.0)
    policy.join(1, 0.0)
    policy.arrive(Arrival(1, 0, 0, 50, 0.0), 5.0)
    actions = policy.leave(1, 6.0)
    assert isinstance(actions[0], Aggregate) and [d.node for d in actions[1:]] == [0]


def test_fedasync_applies_each_arrival_alone_with_staleness() -> None:
    policy = FedAsync()
    policy.join(0, 0.0)
    policy.join(1, 0.0)
    first = policy.arrive(Arrival(1, 0, 0, 50, 0.0), 1.0)
    second = policy.arrive(Arrival(2, 1, 0, 50, 0.0), 2.0)
    assert first[0].updates[0].weight == pytest.approx(0.9)
    assert second[0].updates[0].staleness == 1
    assert second[0].updates[0].weight == pytest.approx(0.9 * 2**-0.5)
    assert second[1] == Dispatch(1, 50, 2)


def test_fedbuff_aggregates_every_k_arrivals() -> None:
    policy = FedBuff(FedBuffConfig(buffer_size=2, server_rate=1.0))
    for node in range(3):
        policy.join(node, 0.0)
    assert [type(a) for a in policy.arrive(Arrival(1, 0, 0, 50, 0.0), 1.0)] == [Dispatch]
    actions = policy.arrive(Arrival(2, 1, 0, 50, 0.0), 2.0)
    assert isinstance(actions[0], Aggregate) and len(actions[0].updates) == 2
    assert all(u.weight == pytest.approx(0.5) for u in actions[0].updates)
    assert actions[1] == Dispatch(1, 50, 1)


@pytest.mark.parametrize("policy", [FedAvg(), FedAsync(), FedBuff()])
def test_snapshots_round_trip(policy) -> None:
    policy.join(0, 0.0)
    policy.join(1, 0.0)
    policy.arrive(Arrival(1, 0, 0, 50, 0.0), 1.0)
    twin = type(policy)()
    twin.restore(policy.snapshot())
    assert twin.snapshot() == policy.snapshot()


def test_run_config_picks_and_checks_the_policy() -> None:
    assert isinstance(RunConfig.from_mapping({}).make_policy(), FedCompass)
    config = RunConfig.from_mapping({"policy": "fedbuff", "buffer-size": 4, "fedbuff-rate": 2})
    policy = config.make_policy()
    assert isinstance(policy, FedBuff) and policy.config.buffer_size == 4
    assert policy.config.server_rate == 2.0
    with pytest.raises(ValueError, match="unknown run config key 'q-maxx'"):
        RunConfig.from_mapping({"q-maxx": 5})
    with pytest.raises(ValueError, match="must be a int"):
        RunConfig.from_mapping({"q-max": 5.5})
    with pytest.raises(ValueError, match="unknown policy"):
        RunConfig.from_mapping({"policy": "fedprox"})
    with pytest.raises(ValueError, match="q_min <= q_max"):
        RunConfig(q_min=80, q_max=40)
